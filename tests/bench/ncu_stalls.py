# Top SASS instructions by warp-stall samples, with the stall-reason columns that are nonzero.
import csv, sys, collections
rows = list(csv.reader(open(sys.argv[1], errors="replace")))
# the header is the first row that has an "Address" or "Source" column
hi = next(i for i, r in enumerate(rows) if "Source" in r)
head, body = rows[hi], [r for r in rows[hi + 1:] if len(r) == len(rows[hi])]
print("columns:", head)
def num(x):
    try: return float(x.replace(",", ""))
    except Exception: return 0.0
samp = next((c for c in head if c.startswith("Warp Stall Sampling (All")), None)
nis = next((c for c in head if c.startswith("Warp Stall Sampling (Not")), None)
si, ni = head.index(samp), head.index(nis) if nis else None
src = head.index("Source")
stall_cols = [i for i, c in enumerate(head) if c.lower().startswith("stall") or "stall_" in c.lower()]
total = sum(num(r[si]) for r in body)
print(f"instructions {len(body)}, samples {total:.0f}")
# per-reason totals
tot = collections.Counter()
for r in body:
    for i in stall_cols: tot[head[i]] += num(r[i])
for k, v in tot.most_common(25):
    if v: print(f"  {k:<50} {v:>10.0f} {100*v/max(total,1):5.1f}%")
# per-opcode totals
op = collections.Counter()
for r in body:
    op[r[src].split()[0] if r[src].split() else "?"] += num(r[si])
print("by opcode:", ", ".join(f"{k} {100*v/max(total,1):.1f}%" for k, v in op.most_common(15)))
print("top instructions (index, samples %, not-issued, source, top reasons):")
order = sorted(range(len(body)), key=lambda i: -num(body[i][si]))
for i in order[:60]:
    r = body[i]
    reasons = sorted(((num(r[j]), head[j]) for j in stall_cols if num(r[j])), reverse=True)[:3]
    print(f"{i:>5} {100*num(r[si])/max(total,1):5.2f}% {num(r[ni]) if ni is not None else 0:>7.0f}  {r[src][:60]:<60} " + "; ".join(f"{n.replace('stall_','')}={v:.0f}" for v, n in reasons))
