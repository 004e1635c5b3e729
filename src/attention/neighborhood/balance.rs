//! Work items of the GNA kernel (one query tile of one batch and head) spread over a persistent
//! grid by their cost: the launcher's `Schedule::Balanced` (src/attention/cuda/neighborhood.rs).
//!
//! Query tiles at the grid's border visit fewer KV tiles than inner ones (stride 1, FLUX-4K:
//! 50 to 81), so a fixed split of the items over a persistent grid leaves some SMs with 3% more
//! work than the mean, and even one CTA per item in grid order ends with a ragged last wave.
//! Here items keep their (batch, head) order, since one head's K/V is the L2 working set, but
//! each head's query tiles go longest first, and a list scheduler on the host (each item to the
//! CTA with the least work so far) hands them out, so the short ones fill the end.
//!
//! The table the kernel reads (`GnaArgs::work_table`): `ctas + 1` offsets into the items, then
//! the items, each `(b H + h) q_tiles + qt`.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use super::tiles::{GnaTiling, KIND_PARTIAL, KIND_PARTIAL_COLUMNS};

/// Cost of a PARTIAL tile relative to a FULL one (its per-element mask; kernels/NOTES.md,
/// ## neighborhood, session 10: ~1.12 at locked clocks, the stride-1 and strided FLUX-4K cases),
/// and of one masked by a bias per column class (KIND_PARTIAL_COLUMNS).
const PARTIAL_COST: f64 = 1.12;
const PARTIAL_COLUMNS_COST: f64 = 1.05;
/// Cost of an item's start and epilogue (Q load, pipeline fill, the store of O), in tiles.
const ITEM_COST: f64 = 1.0;

/// Estimated cost of each query tile's work item, in FULL-tile units.
pub fn item_costs(t: &GnaTiling) -> Vec<f64> {
    (0..t.q_tiles())
        .map(|i| {
            let entries = &t.entries[t.offsets[i] as usize..t.offsets[i + 1] as usize];
            let cost = |e: i32| match e & 3 {
                KIND_PARTIAL => PARTIAL_COST,
                KIND_PARTIAL_COLUMNS => PARTIAL_COLUMNS_COST,
                _ => 1.0,
            };
            ITEM_COST + entries.iter().map(|&e| cost(e)).sum::<f64>()
        })
        .collect()
}

/// The work table of `groups` (batch x heads) copies of the query tiles with `costs` over `ctas`
/// CTAs.
pub fn balanced_table(costs: &[f64], groups: usize, ctas: usize) -> Vec<i32> {
    let q_tiles = costs.len();
    let mut order: Vec<usize> = (0..q_tiles).collect();
    order.sort_by(|&a, &b| costs[b].total_cmp(&costs[a]).then(a.cmp(&b)));
    // the list scheduler: items in order, each to the CTA with the least work (ties: lowest index)
    let mut per_cta: Vec<Vec<i32>> = vec![Vec::new(); ctas];
    let mut free: BinaryHeap<Reverse<(u64, usize)>> = (0..ctas).map(|c| Reverse((0, c))).collect();
    for group in 0..groups {
        for &qt in &order {
            let Some(Reverse((busy, cta))) = free.pop() else { break };
            per_cta[cta].push((group * q_tiles + qt) as i32);
            // integer costs (1/1024 tile) keep the heap's order exact
            free.push(Reverse((busy + (costs[qt] * 1024.0).round() as u64, cta)));
        }
    }
    let mut table = Vec::with_capacity(ctas + 1 + groups * q_tiles);
    let mut offset = 0;
    table.push(0);
    for items in &per_cta {
        offset += items.len() as i32;
        table.push(offset);
    }
    table.extend(per_cta.into_iter().flatten());
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    fn makespan(table: &[i32], costs: &[f64], ctas: usize) -> f64 {
        (0..ctas)
            .map(|c| table[ctas + 1 + table[c] as usize..ctas + 1 + table[c + 1] as usize].iter().map(|&w| costs[w as usize % costs.len()]).sum())
            .fold(0.0, f64::max)
    }

    #[test]
    fn every_item_once_and_the_load_even() {
        // border tiles cheap, inner ones dear, as for a stride-1 window
        let costs: Vec<f64> = (0..512).map(|i| 50.0 + ((i * 37) % 31) as f64).collect();
        let (groups, ctas) = (24, 132);
        let table = balanced_table(&costs, groups, ctas);
        assert_eq!(table.len(), ctas + 1 + groups * costs.len());
        assert!(table[..=ctas].windows(2).all(|w| w[0] <= w[1]));
        let mut items: Vec<i32> = table[ctas + 1..].to_vec();
        items.sort_unstable();
        assert!(items.iter().enumerate().all(|(i, &w)| w == i as i32), "an item missing or repeated");
        // list scheduling: no CTA ends later than the mean plus the smallest item
        let mean = costs.iter().sum::<f64>() * groups as f64 / ctas as f64;
        let round_robin = (0..ctas).map(|c| (c..groups * costs.len()).step_by(ctas).map(|w| costs[w % 512]).sum::<f64>()).fold(0.0, f64::max);
        let span = makespan(&table, &costs, ctas);
        assert!(span <= mean + 50.0, "makespan {span} vs mean {mean}");
        assert!(span < round_robin, "no better than round robin ({span} vs {round_robin})");
        // heads stay in order: each CTA's items never go back to an earlier head
        for c in 0..ctas {
            let own = &table[ctas + 1 + table[c] as usize..ctas + 1 + table[c + 1] as usize];
            assert!(own.windows(2).all(|w| w[0] / 512 <= w[1] / 512));
        }
    }

    #[test]
    fn one_cta_per_item_is_the_cost_order() {
        let costs = [3.0, 5.0, 4.0];
        let table = balanced_table(&costs, 2, 6);
        assert_eq!(table, vec![0, 1, 2, 3, 4, 5, 6, 1, 2, 0, 4, 5, 3]);
    }
}
