//! SANA's resolution binning against diffusers 0.42.1 (tests/goldens/make_resolution_bin_goldens.py):
//! the bin tables, the bin picked for many requested sizes, and resize-and-crop of decoded pixels.

mod common;

use candle_core::{DType, Device, Tensor};
use visgen::pipelines::resolution_bins::{resize_and_crop, ResolutionBins};

fn goldens() -> std::collections::HashMap<String, Tensor> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/goldens/resolution_bins.safetensors");
    candle_core::safetensors::load(path, &Device::Cpu).expect("resolution bin goldens")
}

fn rows_i64(t: &Tensor) -> Vec<Vec<i64>> {
    t.to_vec2::<i64>().unwrap()
}

#[test]
fn tables_and_chosen_bins_match_diffusers() {
    let g = goldens();
    let queries = rows_i64(&g["classify/queries"]);
    for sample_size in [16usize, 32, 64, 128] {
        let bins = ResolutionBins::for_sample_size(sample_size).expect("a table");
        let table = g[&format!("table/{sample_size}")].to_vec2::<f64>().unwrap();
        let ours: Vec<(f64, usize, usize)> = bins.entries().collect();
        assert_eq!(ours.len(), table.len(), "table {sample_size}");
        for (o, t) in ours.iter().zip(&table) {
            assert_eq!((o.0, o.1 as f64, o.2 as f64), (t[0], t[1], t[2]), "table {sample_size}");
        }
        let expected = rows_i64(&g[&format!("classify/{sample_size}")]);
        for (q, e) in queries.iter().zip(&expected) {
            let (h, w) = bins.closest(q[0] as usize, q[1] as usize);
            assert_eq!([h as i64, w as i64], [e[0], e[1]], "sample_size {sample_size}, asked {q:?}");
        }
    }
    assert!(ResolutionBins::for_sample_size(8).is_none());
}

#[test]
fn resize_and_crop_matches_diffusers() {
    let g = goldens();
    let input = &g["resize/input"];
    for (i, size) in rows_i64(&g["resize/sizes"]).iter().enumerate() {
        let expected = &g[&format!("resize/{i}")];
        let ours = resize_and_crop(input, size[0] as usize, size[1] as usize).unwrap();
        assert_eq!(ours.dims(), expected.dims(), "case {i}: {size:?}");
        let err = common::max_rel_err(&ours.to_dtype(DType::F32).unwrap(), expected);
        assert!(err <= 1e-5, "case {i} {size:?}: max rel err {err:.2e}");
    }
}
