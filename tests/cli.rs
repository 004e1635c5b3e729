//! The `gen` binary: bad input is a one-line error with exit code 2, never a panic.

use std::process::Command;

fn gen(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_gen")).args(args).output().expect("run gen");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn assert_usage_error(args: &[&str], needle: &str) {
    let (code, _out, err) = gen(args);
    assert_eq!(code, 2, "{args:?} should exit 2; stderr: {err}");
    assert!(err.contains(needle), "{args:?}: stderr should mention `{needle}`: {err}");
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
}

#[test]
fn models_lists_every_spec() {
    let (code, out, err) = gen(&["models"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.lines().any(|l| l.starts_with("sana-1600m")), "{out}");
}

#[test]
fn bad_input_is_a_clear_error() {
    let tmp = std::env::temp_dir().join("visgen_cli_test.png");
    let out = tmp.to_str().unwrap();
    assert_usage_error(&["image", "--prompt", "a cat", "--model", "no-such-model", "--out", out], "no-such-model");
    assert_usage_error(&["image", "--prompt", "  ", "--out", out], "prompt");
    assert_usage_error(&["image", "--prompt", "a cat", "--out", "/no/such/dir/x.png"], "/no/such/dir/x.png");
    assert_usage_error(&["image", "--prompt", "a cat", "--out", "x.bmp"], ".png");
    assert_usage_error(&["image", "--prompt", "a cat", "--attention", "self=warp", "--out", out], "warp");
    assert_usage_error(&["image", "--prompt", "a cat", "--device", "tpu", "--out", out], "tpu");
    assert_usage_error(&["image", "--prompt", "a cat", "--dtype", "f8", "--out", out], "f8");
    assert_usage_error(&["image", "--prompt", "a cat", "--steps", "0", "--out", out], "steps");
    assert_usage_error(&["image", "--prompt", "a cat", "--width", "99999", "--out", out], "16384");
    assert_usage_error(&["image", "--prompt", "a cat", "--model", "/no/spec.toml", "--out", out], "/no/spec.toml");
    // clap's own usage errors also exit 2
    let (code, _, _) = gen(&["image"]);
    assert_eq!(code, 2);
    assert!(!tmp.exists(), "a failed run must not leave an output file");
}
