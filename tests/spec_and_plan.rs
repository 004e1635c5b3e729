//! Pipeline specs parse, reject what they should with the key named, and resolve per layer.

use std::path::Path;

use candle_core::{DType, Device};
use visgen::attention::plan::{AttentionPlan, LayerRef};
use visgen::attention::{Backend, LayerShape, Role};
use visgen::spec::{list_specs, PipelineSpec};

const BASE: &str = r#"
name = "t"
description = "test"
family = "sana"
preset = "tiny"
[weights]
random = 0
[scheduler]
kind = "flow-euler"
steps = 2
"#;

fn parse(extra: &str) -> visgen::Result<PipelineSpec> {
    PipelineSpec::parse(&format!("{BASE}{extra}"), Path::new("test.toml"))
}

fn shape(role: Role, grid: Option<Vec<usize>>, key_mask: bool) -> LayerShape {
    LayerShape { role, head_dim: 32, grid, key_mask, dtype: DType::F32, device: Device::Cpu }
}

fn layer(index: usize, name: &str, role: Role) -> LayerRef<'_> {
    LayerRef { index, name, role }
}

#[test]
fn every_shipped_spec_parses() {
    let specs = list_specs().unwrap();
    assert!(specs.iter().any(|s| s.name == "sana-1600m"), "sana-1600m spec missing");
    for s in &specs {
        assert_eq!(s.source.file_stem().unwrap().to_str().unwrap(), s.name, "file name must equal spec name");
    }
}

#[test]
fn unknown_keys_are_named() {
    let err = parse("colour = 3\n").unwrap_err().to_string();
    assert!(err.contains("colour"), "{err}");
    let err = parse("[attention]\nself = { backend = \"linear\", windw = 3 }\n").unwrap_err().to_string();
    assert!(err.contains("windw"), "{err}");
    let err = parse("[attention]\nself = { backend = \"linear\", stride = [2] }\n").unwrap_err().to_string();
    assert!(err.contains("stride") && err.contains("linear"), "{err}");
    let err = parse("[attention]\nself = { backend = \"flash\" }\n").unwrap_err().to_string();
    assert!(err.contains("flash"), "{err}");
}

#[test]
fn weights_need_exactly_one_source() {
    let text = BASE.replace("random = 0", "random = 0\nrepo = \"a/b\"");
    let err = PipelineSpec::parse(&text, Path::new("x.toml")).unwrap_err().to_string();
    assert!(err.contains("exactly one"), "{err}");
}

#[test]
fn role_defaults_and_overrides_resolve_per_layer() {
    let spec = parse(
        r#"
[attention]
self = { backend = "linear" }
cross = { backend = "dense" }
[[attention.override]]
layers = "2-3"
role = "self"
use = { backend = "neighborhood", kernel = [3, 3] }
[[attention.override]]
name = "blocks.5.*"
use = { backend = "dense", scale = 0.5 }
"#,
    )
    .unwrap();
    let plan = AttentionPlan::from_spec(&spec.attention).unwrap();
    let s = shape(Role::SelfAttention, Some(vec![8, 8]), false);
    let c = shape(Role::Cross, None, true);
    let name = |b: &Backend| b.name();
    assert_eq!(name(&plan.resolve(&layer(0, "blocks.0.attn1", Role::SelfAttention), &s).unwrap()), "linear");
    assert_eq!(name(&plan.resolve(&layer(2, "blocks.2.attn1", Role::SelfAttention), &s).unwrap()), "neighborhood");
    assert_eq!(name(&plan.resolve(&layer(2, "blocks.2.attn2", Role::Cross), &c).unwrap()), "dense");
    match plan.resolve(&layer(5, "blocks.5.attn1", Role::SelfAttention), &s).unwrap() {
        Backend::Dense(p) => assert_eq!(p.scale, Some(0.5)),
        other => panic!("expected dense, got {other:?}"),
    }
}

#[test]
fn cli_overrides_win_and_bad_ones_are_errors() {
    let mut plan = AttentionPlan::uniform(
        Backend::Linear(Default::default()),
        Backend::Dense(Default::default()),
    );
    plan.add_cli_override("self=dense").unwrap();
    plan.add_cli_override("1=neighborhood,kernel=3x3,stride=1x1,causal=0x0").unwrap();
    let s = shape(Role::SelfAttention, Some(vec![8, 8]), false);
    assert_eq!(plan.resolve(&layer(0, "b.0", Role::SelfAttention), &s).unwrap().name(), "dense");
    match plan.resolve(&layer(1, "b.1", Role::SelfAttention), &s).unwrap() {
        Backend::Neighborhood(p) => {
            assert_eq!(p.kernel, vec![3, 3]);
            assert_eq!(p.causal, vec![false, false]);
        }
        other => panic!("expected neighborhood, got {other:?}"),
    }
    for bad in ["self", "self=warp", "=dense", "self=dense,eps=1", "3-1=dense", "self=neighborhood,kernel=3x3,stride=1"] {
        let err = plan.clone().add_cli_override(bad);
        assert!(err.is_err(), "`{bad}` should be refused");
        assert_eq!(err.unwrap_err().exit_code(), 2);
    }
}

#[test]
fn a_refusing_backend_fails_the_load_or_uses_its_fallback() {
    // Linear attention cannot serve a masked cross-attention layer.
    let strict = parse("[attention]\ncross = { backend = \"linear\" }\n").unwrap();
    let plan = AttentionPlan::from_spec(&strict.attention).unwrap();
    let c = shape(Role::Cross, None, true);
    let err = plan.resolve(&layer(0, "blocks.0.attn2", Role::Cross), &c).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("blocks.0.attn2") && msg.contains("linear"), "{msg}");
    assert_eq!(err.exit_code(), 2);

    let lenient = parse("[attention]\ncross = { backend = \"linear\", fallback = \"dense\" }\n").unwrap();
    let plan = AttentionPlan::from_spec(&lenient.attention).unwrap();
    assert_eq!(plan.resolve(&layer(0, "blocks.0.attn2", Role::Cross), &c).unwrap().name(), "dense");
}
