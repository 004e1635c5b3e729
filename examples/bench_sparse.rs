//! Times the sparse attention CUDA kernels (GNA, and PSA when present) against our dense kernel
//! on the same shapes, in the same run (bf16, random inputs):
//!
//!   cargo run --release --features cuda --example bench_sparse [-- --reps N] [--psa-only | --gna-only]
//!     [--case NAME] [--profile [--in-place] [--always-masked] [--schedule NAME]]
//!     (--psa-only --profile: two PSA forward calls, for ncu)
//!
//! Per case: time (median of samples of back-to-back calls between CUDA events; the GNA time
//! includes the permutation kernel), effective TFLOP/s (4 N K D per head, K = keys per query),
//! tile TFLOP/s (the FLOPs of the visited 128x128 tiles, extra-token tiles included), our dense
//! kernel's time, speedup, fraction of KV tiles visited and the goal speedup 0.9 / fraction.
//! The fraction counts the extra-token (text) tiles on both sides: GNA visits them for every
//! query tile and the dense kernel attends the extra keys too, so it is (grid tiles visited +
//! extra tiles visited) / (query tiles x (grid KV tiles + extra KV tiles)).
//! Then the same call under the launcher's other configurations (`gna::KernelOptions`): plain
//! (q permuted, no ping-pong), each of those alone, in place, the CTA schedules.
//! The sparse and the dense samples alternate (GNA, and the PSA total), and the speedup is the
//! median of the per-round ratios: the card slows under sustained load, so timing the dense
//! kernel after a long series of sparse calls (as before 2026-11-29 session 6) flattered the
//! speedup by ~5% (kernels/NOTES.md, ## neighborhood v4).

#[cfg(feature = "cuda")]
fn main() -> anyhow::Result<()> {
    use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags;
    use candle_core::{DType, Device, Tensor};
    use visgen::attention::cuda::{dense, neighborhood as gna};
    use visgen::attention::NeighborhoodParams;
    use visgen::attention::neighborhood::tiles as gna_tiles;

    let reps: usize = match std::env::args().position(|a| a == "--reps") {
        Some(i) => std::env::args().nth(i + 1).and_then(|s| s.parse().ok()).unwrap_or(5),
        None => 5,
    };
    // --psa-only: skip the GNA cases (shorter device calls).
    let psa_only = std::env::args().any(|a| a == "--psa-only");
    // --gna-only: skip the PSA case.
    let gna_only = std::env::args().any(|a| a == "--gna-only");
    // --case NAME: only the GNA case of that exact name.
    let case_filter: Option<String> = std::env::args().position(|a| a == "--case").and_then(|i| std::env::args().nth(i + 1));
    // --profile: per GNA case two GNA calls, then two dense calls on the same inputs (warm-up +
    // one for the profiler, which picks the kernel by name), no timing.
    let profile = std::env::args().any(|a| a == "--profile");
    let device = Device::new_cuda(0)?;
    let dev = device.as_cuda_device()?.clone();
    // The device as `gen` opens it (pipelines/request.rs): no per-allocation events, and freed
    // memory kept in the pool. --release-freed-memory: the driver's default (freed memory goes
    // back at every synchronization, so each sample's first call maps its scratch buffers anew:
    // ~0.2 ms of PSA's ~0.7 GB per call; the measurement before 2026-11-29).
    visgen::cuda_graph::prepare_device(&dev);
    if !std::env::args().any(|a| a == "--release-freed-memory") {
        visgen::kernels::keep_freed_memory(&dev)?;
    }
    let stream = dev.cuda_stream();
    // ms per call of `calls` back-to-back calls of `f`, between two CUDA events.
    let sample = |calls: usize, f: &mut dyn FnMut() -> anyhow::Result<()>| -> anyhow::Result<f64> {
        let e0 = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(|e| anyhow::anyhow!("{e:?}"))?;
        for _ in 0..calls {
            f()?;
        }
        let e1 = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(|e| anyhow::anyhow!("{e:?}"))?;
        Ok(e0.elapsed_ms(&e1).map_err(|e| anyhow::anyhow!("{e:?}"))? as f64 / calls as f64)
    };
    let median = |mut v: Vec<f64>| -> f64 {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    // Median ms per call of `f` over `reps` samples of `calls` calls, after one warm-up call.
    let time = |calls: usize, f: &mut dyn FnMut() -> anyhow::Result<()>| -> anyhow::Result<f64> {
        f()?;
        let samples = (0..reps).map(|_| sample(calls, f)).collect::<anyhow::Result<Vec<f64>>>()?;
        Ok(median(samples))
    };
    // A sparse kernel against the dense one, alternating so that both run in the same clock and
    // power state (the card slows under sustained load: a kernel timed after a long run of
    // others reads slower). Per round: one untimed sparse call (the dense call evicted its data
    // from L2), `calls` timed sparse calls, one timed dense call; after a warm-up of each.
    // Returns the median sparse ms, median dense ms and the median of the per-round ratios.
    type Run<'a> = &'a mut dyn FnMut() -> anyhow::Result<()>;
    let alternate = |calls: usize, sparse: Run, dense: Run| -> anyhow::Result<(f64, f64, f64)> {
        sparse()?;
        dense()?;
        let (mut sparse_ms, mut dense_ms, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..reps {
            sparse()?;
            let s = sample(calls, sparse)?;
            let d = sample(1, dense)?;
            sparse_ms.push(s);
            dense_ms.push(d);
            ratios.push(d / s);
        }
        Ok((median(sparse_ms), median(dense_ms), median(ratios)))
    };
    // Several configurations against the dense kernel, interleaved: per round and configuration
    // one timed dense call, one untimed and `calls` timed calls of the configuration. Returns per
    // configuration the median ms and the median of the per-round ratios dense / it. Each
    // configuration starts from the state the dense call leaves the card in: timed one after the
    // other, a configuration read up to 12% faster after a slow, low-power one (the in-place
    // reads) as the clock rose, and later ones up to ~3% faster (session 8, device runs 3-6).
    let interleaved = |calls: usize, configs: &mut [Run], dense: Run| -> anyhow::Result<Vec<(f64, f64)>> {
        let mut ms = vec![Vec::new(); configs.len()];
        let mut ratios = vec![Vec::new(); configs.len()];
        for _ in 0..reps {
            for (i, f) in configs.iter_mut().enumerate() {
                let d = sample(1, dense)?;
                f()?;
                let t = sample(calls, *f)?;
                ms[i].push(t);
                ratios[i].push(d / t);
            }
        }
        Ok(ms.into_iter().zip(ratios).map(|(m, r)| (median(m), median(r))).collect())
    };

    struct Case {
        name: &'static str,
        grid: Vec<usize>,
        kernel: Vec<usize>,
        stride: Vec<usize>,
        heads: usize,
        d: usize,
        extra: usize,
    }
    let cases = [
        Case { name: "FLUX-4K 2-D k80 s16", grid: vec![256, 256], kernel: vec![80, 80], stride: vec![16, 16], heads: 24, d: 128, extra: 0 },
        Case { name: "FLUX-4K 2-D k80 s1", grid: vec![256, 256], kernel: vec![80, 80], stride: vec![1, 1], heads: 24, d: 128, extra: 0 },
        Case { name: "FLUX-4K k80 s16 +512 txt", grid: vec![256, 256], kernel: vec![80, 80], stride: vec![16, 16], heads: 24, d: 128, extra: 512 },
        Case { name: "video 3-D k18x24x24 s16x8x8", grid: vec![30, 48, 80], kernel: vec![18, 24, 24], stride: vec![16, 8, 8], heads: 24, d: 128, extra: 0 },
    ];
    println!(
        "{:<28} {:>9} {:>8} {:>8} {:>10} {:>8} {:>9} {:>8} {:>6}",
        "case", "GNA ms", "eff TF/s", "tile TF/s", "dense ms", "speedup", "fraction", "goal", "met"
    );
    let selected = |c: &&Case| !psa_only && case_filter.as_deref().is_none_or(|f| c.name == f);
    for c in cases.iter().filter(selected) {
        let n: usize = c.grid.iter().product();
        let p = NeighborhoodParams {
            kernel: c.kernel.clone(),
            stride: c.stride.clone(),
            dilation: vec![1; c.grid.len()],
            causal: vec![false; c.grid.len()],
            scale: None,
        };
        let rnd = |len: usize| -> anyhow::Result<Tensor> {
            Ok(Tensor::randn(0f32, 1.0, (1, c.heads, len, c.d), &device)?.to_dtype(DType::BF16)?)
        };
        let (q, k, v) = (rnd(n)?, rnd(n)?, rnd(n)?);
        let (k2, v2) = (rnd(c.extra.max(1))?, rnd(c.extra.max(1))?);
        let extra = (c.extra > 0).then_some((&k2, &v2));
        let scale = 1.0 / (c.d as f64).sqrt();
        let tiling = gna::device_tiling(&dev, &c.grid, &p, c.extra)?;
        let t = &tiling.tiling;
        if profile {
            // --in-place (q, k, v read in place, no permutation pass), --always-masked (the masking
            // kernel on lists without a tile to mask): those options, to compare (ncu at locked clocks).
            // --schedule consecutive|persistent|balanced: the CTA schedule.
            let schedule = match std::env::args().position(|a| a == "--schedule").and_then(|i| std::env::args().nth(i + 1)).as_deref() {
                None => gna::KernelOptions::default().schedule,
                Some("consecutive") => gna::Schedule::Consecutive(1),
                Some("persistent") => gna::Schedule::Persistent,
                Some("balanced") => gna::Schedule::Balanced,
                Some(other) => anyhow::bail!("--schedule {other}: consecutive, persistent or balanced"),
            };
            let opts = gna::KernelOptions {
                in_place: std::env::args().any(|a| a == "--in-place"),
                always_masked: std::env::args().any(|a| a == "--always-masked"),
                schedule,
                ..Default::default()
            };
            for _ in 0..2 {
                gna::forward_with(&q, &k, &v, &c.grid, &p, extra, scale, &opts)?;
            }
            for _ in 0..2 {
                dense::forward(&q, &k, &v, None, extra, scale)?;
            }
            device.synchronize()?;
            println!("{}: profiled ({} KV tiles visited, {} full)", c.name, t.visited, t.full);
            continue;
        }
        let (sparse_ms, dense_ms, speedup) = alternate(
            3,
            &mut || {
                gna::forward(&q, &k, &v, &c.grid, &p, extra, scale)?;
                Ok(())
            },
            &mut || {
                dense::forward(&q, &k, &v, None, extra, scale)?;
                Ok(())
            },
        )?;
        // The host side of a call (no synchronization): the first call of a sample waits for it.
        let host_ms = {
            device.synchronize()?;
            let t0 = std::time::Instant::now();
            for _ in 0..5 {
                gna::forward(&q, &k, &v, &c.grid, &p, extra, scale)?;
            }
            let ms = t0.elapsed().as_secs_f64() * 1e3 / 5.0;
            device.synchronize()?;
            ms
        };
        // The same under the launcher's other configurations, to compare.
        use gna::{KernelOptions as Opts, Schedule};
        let plain = Opts { permute_q: true, pingpong: false, ..Default::default() };
        let variants: [(&str, Opts); 10] = [
            ("plain (q permuted, no ping-pong)", plain),
            ("no ping-pong", Opts { pingpong: false, ..Default::default() }),
            ("q permuted", Opts { permute_q: true, ..Default::default() }),
            ("in place (no permutation pass)", Opts { in_place: true, ..Default::default() }),
            ("one query tile per CTA", Opts { schedule: Schedule::Consecutive(1), ..Default::default() }),
            ("2 query tiles per CTA", Opts { schedule: Schedule::Consecutive(2), ..Default::default() }),
            ("persistent (round robin, 1 CTA per SM)", Opts { schedule: Schedule::Persistent, ..Default::default() }),
            ("persistent, no ping-pong", Opts { schedule: Schedule::Persistent, pingpong: false, ..Default::default() }),
            ("persistent, balanced by cost on the host", Opts { schedule: Schedule::Balanced, ..Default::default() }),
            ("masking kernel (default when a tile needs a mask)", Opts { always_masked: true, ..Default::default() }),
        ];
        let mut runs: Vec<Box<dyn FnMut() -> anyhow::Result<()>>> = variants
            .iter()
            .map(|(_, opts)| {
                let (q, k, v, grid, p) = (&q, &k, &v, &c.grid, &p);
                Box::new(move || {
                    gna::forward_with(q, k, v, grid, p, extra, scale, opts)?;
                    Ok(())
                }) as Box<dyn FnMut() -> anyhow::Result<()>>
            })
            .collect();
        let mut run_refs: Vec<Run> = runs.iter_mut().map(|r| r.as_mut() as Run).collect();
        let timed = interleaved(3, &mut run_refs, &mut || {
            dense::forward(&q, &k, &v, None, extra, scale)?;
            Ok(())
        })?;
        let variant_ms: Vec<(&str, (f64, f64))> = variants.iter().map(|(name, _)| *name).zip(timed).collect();
        let keys_per_query = c.kernel.iter().product::<usize>() + c.extra;
        let flops_eff = 4.0 * (c.heads * n) as f64 * keys_per_query as f64 * c.d as f64;
        let extra_tiles = t.entries.len() - t.visited; // extra-token tiles visited (every query tile with a real query)
        let flops_tiles = 4.0 * c.heads as f64 * ((t.visited + extra_tiles) * 128 * 128) as f64 * c.d as f64;
        let fraction = t.visited_fraction();
        let goal = 0.9 / fraction;
        println!(
            "{:<28} {:>9.3} {:>8.0} {:>8.0} {:>10.3} {:>8.2} {:>9.4} {:>8.2} {:>6}",
            c.name,
            sparse_ms,
            flops_eff / (sparse_ms * 1e-3) / 1e12,
            flops_tiles / (sparse_ms * 1e-3) / 1e12,
            dense_ms,
            speedup,
            fraction,
            goal,
            if speedup >= goal { "yes" } else { "no" }
        );
        println!("    host time per call (no synchronization)      {host_ms:>8.3} ms");
        println!("    configurations, interleaved (median ms, median speedup over the dense calls of the same rounds):");
        for (name, (ms, speedup)) in &variant_ms {
            println!("    {name:<48} {ms:>8.3} ms (speedup {speedup:.2})");
        }
        println!(
            "    box {:?}, {} query tiles, {} KV tiles visited ({} full, {} partial ({} by column class), {} keep-word patterns), \
             {} extra-token tiles visited; fraction = ({} + {}) / ({} x ({} + {})); grid tiles alone {:.4}",
            t.axes.map(|a| a.tile),
            t.q_tiles(),
            t.visited,
            t.full,
            t.visited - t.full,
            t.entries.iter().filter(|&&e| e & 3 == gna_tiles::KIND_PARTIAL_COLUMNS).count(),
            t.patterns(),
            extra_tiles,
            t.visited,
            extra_tiles,
            n.div_ceil(128),
            n.div_ceil(128),
            c.extra.div_ceil(128),
            t.visited as f64 / (n.div_ceil(128) as f64).powi(2)
        );
    }

    // PSA at its defaults (10% full, 5% 2x, 0% 4x, 20% 8x, 65% skipped) on SANA-Video 480p.
    // --psa-only --profile: two `psa::forward` calls (warm-up + one for the profiler), no timing.
    if !gna_only && case_filter.is_none() && profile && psa_only {
        use visgen::attention::cuda::pyramid as psa;
        use visgen::attention::PyramidParams;
        let p = PyramidParams::default();
        let rnd = || -> anyhow::Result<Tensor> { Ok(Tensor::randn(0f32, 1.0, (1, 20, 32760, 112), &device)?.to_dtype(DType::BF16)?) };
        let (q, k, v) = (rnd()?, rnd()?, rnd()?);
        for _ in 0..2 {
            psa::forward(&q, &k, &v, &p)?;
        }
        device.synchronize()?;
        println!("PSA H20 N32760 D112 defaults: profiled (2 forward calls)");
    }
    if !gna_only && case_filter.is_none() && !profile {
        use visgen::attention::cuda::pyramid as psa;
        use visgen::attention::PyramidParams;
        let (b, h, n, d) = (1usize, 20usize, 32760usize, 112usize);
        let p = PyramidParams::default();
        let rnd = || -> anyhow::Result<Tensor> { Ok(Tensor::randn(0f32, 1.0, (b, h, n, d), &device)?.to_dtype(DType::BF16)?) };
        let (q, k, v) = (rnd()?, rnd()?, rnd()?);
        let scale = 1.0 / (d as f64).sqrt();
        // The wgmma importance kernel (v3) first, on its own: printed before anything else runs.
        let tc_ms = time(3, &mut || {
            psa::importance_ranked_tc(&q, &k, &p, scale)?;
            Ok(())
        })?;
        let (qb, kb) = (n.div_ceil(128), n.div_ceil(64));
        let gemm_flops = 2.0 * (b * h * qb * 32 * kb * 16 * d) as f64;
        println!(
            "PSA importance v3 (gather + wgmma kernel with the ranking fused): {tc_ms:.3} ms, {:.0} TFLOP/s on the sampled GEMM",
            gemm_flops / (tc_ms * 1e-3) / 1e12
        );
        // v4's warp sort (default) against v3's block-wide sort: time and identical rankings.
        {
            let block_sort = psa::RankingSort::BlockWide;
            let block_ms = time(3, &mut || {
                psa::importance_ranked_tc_with(&q, &k, &p, scale, block_sort)?;
                Ok(())
            })?;
            let (_, r_block) = psa::importance_ranked_tc_with(&q, &k, &p, scale, block_sort)?;
            let (_, r_warp) = psa::importance_ranked_tc(&q, &k, &p, scale)?;
            let same = r_block.flatten_all()?.to_vec1::<u32>()? == r_warp.flatten_all()?.to_vec1::<u32>()?;
            println!("PSA importance with the v3 block-wide sort: {block_ms:.3} ms; rankings identical to the warp sort: {same}");
        }
        let (total_ms, dense_ms, speedup) = alternate(
            3,
            &mut || {
                psa::forward(&q, &k, &v, &p)?;
                Ok(())
            },
            &mut || {
                dense::forward(&q, &k, &v, None, None, scale)?;
                Ok(())
            },
        )?;
        // The host side of one call (argument checks, schedule, tensor maps, allocations,
        // launches; no synchronization): the first of a sample's calls waits for it on the GPU.
        {
            device.synchronize()?;
            let t0 = std::time::Instant::now();
            for _ in 0..5 {
                psa::forward(&q, &k, &v, &p)?;
            }
            let host_ms = t0.elapsed().as_secs_f64() * 1e3 / 5.0;
            device.synchronize()?;
            println!("PSA host time per forward call (no synchronization): {host_ms:.3} ms");
        }
        let importance_ms = time(3, &mut || {
            psa::importance_ranked(&q, &k, &p, scale)?;
            Ok(())
        })?;
        let fused_ms = time(3, &mut || {
            psa::importance_ranked_fused(&q, &k, &p, scale)?;
            Ok(())
        })?;
        let ops_ms = time(1, &mut || {
            psa::importance_ranked_ops(&q, &k, &p, scale)?;
            Ok(())
        })?;
        let (imp, ranked) = psa::importance_ranked(&q, &k, &p, scale)?;
        let (imp_v2, ranked_v2) = psa::importance_ranked_fused(&q, &k, &p, scale)?;
        let sort_ms = time(3, &mut || {
            imp_v2.arg_sort_last_dim(false)?;
            Ok(())
        })?;
        println!(
            "PSA importance v2: fused kernel + arg_sort {fused_ms:.3} ms (arg_sort alone {sort_ms:.3} ms, kernel ~{:.3} ms, \
             {:.0} TFLOP/s on the sampled GEMM); candle-ops path {ops_ms:.3} ms",
            fused_ms - sort_ms,
            gemm_flops / ((fused_ms - sort_ms).max(1e-6) * 1e-3) / 1e12
        );
        // v3 against v2 on this shape: importance difference and the kept (top 35%) blocks.
        {
            let a = imp.flatten_all()?.to_vec1::<f32>()?;
            let c = imp_v2.flatten_all()?.to_vec1::<f32>()?;
            let max_diff = a.iter().zip(&c).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
            let peak = c.iter().cloned().fold(0f32, f32::max);
            let (r3, r2) = (ranked.flatten_all()?.to_vec1::<u32>()?, ranked_v2.flatten_all()?.to_vec1::<u32>()?);
            let keep = psa::schedule(kb, &p).iter().map(|&(_, s, nb)| s + nb).max().unwrap_or(0);
            let mut same = 0usize;
            for (x, y) in r3.chunks(kb).zip(r2.chunks(kb)) {
                let mut x: Vec<u32> = x[..keep].to_vec();
                let mut y: Vec<u32> = y[..keep].to_vec();
                x.sort_unstable();
                y.sort_unstable();
                same += (x == y) as usize;
            }
            println!(
                "PSA importance v3 vs v2: max |diff| {max_diff:.2e} (peak {peak:.2e}); same kept set (top {keep} of {kb}) in {same} of {} rows",
                r3.len() / kb
            );
        }
        let attention = |opts: psa::AttentionOptions| -> anyhow::Result<(f64, Tensor)> {
            let ms = time(3, &mut || {
                psa::forward_with_ranking(&q, &k, &v, &ranked, &p, &opts)?;
                Ok(())
            })?;
            Ok((ms, psa::forward_with_ranking(&q, &k, &v, &ranked, &p, &opts)?.0))
        };
        let (attention_ms, o_pers) = attention(Default::default())?;
        let (serial_ms, _) = attention(psa::AttentionOptions { serial_producer: true, ..Default::default() })?;
        let (per_item_ms, o_item) = attention(psa::AttentionOptions { grid: psa::Grid::PerItem, ..Default::default() })?;
        let same = (o_item.to_dtype(DType::F32)? - o_pers.to_dtype(DType::F32)?)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()? == 0.0;
        println!(
            "PSA pool + attention: persistent lane-parallel producer {attention_ms:.3} ms, one CTA per item (v3 grid) {per_item_ms:.3} ms \
             (bit-identical: {same}), v1 one-thread producer {serial_ms:.3} ms"
        );
        // Where pool + attention goes: the pooling pass alone, and the attention kernel on tiles
        // of one level each (same ranking, 40 tiles per query block where the level has them).
        {
            let pool_ms = time(3, &mut || {
                psa::pool_kv(&k, &v, &p)?;
                Ok(())
            })?;
            let pooled = psa::pool_kv(&k, &v, &p)?;
            let kb = n.div_ceil(64) as f64;
            let dense_rate = 4.0 * (b * h * n * n * d) as f64 / (dense_ms * 1e-3) / 1e12;
            let mut line = format!("PSA pool alone {pool_ms:.3} ms; attention kernel alone (tile TFLOP/s; dense {dense_rate:.0}):");
            let no_pingpong = psa::AttentionOptions { pingpong: false, ..Default::default() };
            for (name, levels, opts) in [
                ("defaults", p.levels.clone(), Default::default()),
                ("defaults, no ping-pong", p.levels.clone(), no_pingpong),
                ("pool 1 only", vec![(1, 80.0 / kb)], Default::default()),
                ("pool 2 only", vec![(2, 160.0 / kb)], Default::default()),
                ("pool 8 only", vec![(8, 1.0)], Default::default()),
            ] {
                let lp = PyramidParams { levels, ..p.clone() };
                let ms = time(3, &mut || {
                    psa::attention_pooled(&q, &k, &v, &pooled, &ranked, &lp, &opts)?;
                    Ok(())
                })?;
                let tiles = psa::schedule(n.div_ceil(64), &lp).len();
                let flops = 4.0 * (b * h * n.div_ceil(128) * tiles * 128 * 128 * d) as f64;
                line += &format!(" {name} {ms:.3} ms ({tiles} tiles, {:.0});", flops / (ms * 1e-3) / 1e12);
            }
            println!("{line}");
        }
        let kb = n.div_ceil(64);
        let sched = psa::schedule(kb, &p);
        let fraction = sched.len() as f64 / n.div_ceil(128) as f64;
        let tile_flops = 4.0 * (b * h * n.div_ceil(128) * sched.len() * 128 * 128 * d) as f64;
        println!(
            "PSA H{h} N{n} D{d} defaults: total {total_ms:.3} ms (importance {importance_ms:.3}, pool + attention {attention_ms:.3}), \
             dense {dense_ms:.3} ms, speedup {:.2} (goal 4), attention alone {:.2}x, tiles visited {fraction:.4} ({} per query block), \
             attention tile TFLOP/s {:.0}",
            speedup,
            dense_ms / attention_ms,
            sched.len(),
            tile_flops / (attention_ms * 1e-3) / 1e12
        );
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn main() {
    eprintln!("bench_sparse needs the `cuda` feature");
}
