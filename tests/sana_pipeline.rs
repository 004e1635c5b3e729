//! The SANA text-to-image pipeline against diffusers, from prompt to pixels, on a tiny random model
//! saved by diffusers as a local hub-layout folder (tests/goldens/make_sana_pipeline_golden.py):
//! the folder is read through a pipeline spec, the denoising starts from diffusers' initial latents,
//! and the final latents and decoded pixels must match. Then the `gen` binary makes a PNG from the
//! same spec, and broken copies of the folder give exit code 2 naming the file (and tensor).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use visgen::pipelines::sana::{to_images, SanaPipeline};
use visgen::pipelines::{Flow, ImageRequest, LoadOptions, Pipeline};
use visgen::spec::PipelineSpec;

fn goldens() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/goldens")
}

struct Golden {
    tensors: HashMap<String, Tensor>,
    meta: HashMap<String, String>,
}

impl Golden {
    fn load() -> Self {
        let bytes = std::fs::read(goldens().join("sana_tiny_pipeline.safetensors")).expect("golden file");
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let meta = meta.metadata().clone().expect("metadata");
        let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).unwrap();
        Self { tensors, meta }
    }

    fn tensor(&self, name: &str) -> &Tensor {
        self.tensors.get(name).unwrap_or_else(|| panic!("golden tensor {name}"))
    }

    fn meta(&self, key: &str) -> &str {
        self.meta.get(key).unwrap_or_else(|| panic!("golden metadata {key}"))
    }

    fn request(&self) -> ImageRequest {
        let number = |key: &str| self.meta(key).parse::<f64>().unwrap();
        ImageRequest::new(self.meta("prompt"))
            .negative_prompt(self.meta("negative_prompt"))
            .steps(number("steps") as usize)
            .cfg(number("guidance"))
            .size(number("width") as usize, number("height") as usize)
    }
}

fn spec() -> PipelineSpec {
    PipelineSpec::load(&goldens().join("sana-tiny-pipeline.toml")).expect("spec")
}

fn load(spec: PipelineSpec) -> Box<SanaPipeline> {
    match Pipeline::from_spec(spec, &LoadOptions::default()).expect("load the tiny diffusers folder") {
        Pipeline::Sana(p) => p,
        Pipeline::TinyShapes(_) => panic!("the spec names the sana family"),
    }
}

/// max|a - b| / max|b|
fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    let scale = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    diff / scale
}

/// diffusers' `output_type="pt"` postprocessing: `(x / 2 + 0.5).clamp(0, 1)`.
fn postprocess(pixels: &Tensor) -> Tensor {
    ((pixels / 2.0).unwrap() + 0.5).unwrap().clamp(0f32, 1f32).unwrap()
}

fn check_case(case: &str, spec: PipelineSpec) {
    let golden = Golden::load();
    let pipe = load(spec);
    let (initial, request) = if case == "sprint" {
        let steps = golden.meta("sprint_steps").parse().unwrap();
        (golden.tensor("input.sprint_latents").clone(), golden.request().steps(steps))
    } else {
        (golden.tensor("input.latents").clone(), golden.request())
    };
    let out = pipe.generate_from_latents(&request, initial, &mut |_| Flow::Continue).expect("generate");
    let latents = rel_err(&out.latents, golden.tensor(&format!("{case}.latents")));
    let decoded = rel_err(&out.pixels, golden.tensor(&format!("{case}.decoded")));
    let image = rel_err(&postprocess(&out.pixels), golden.tensor(&format!("{case}.image")));
    println!("{case}: max rel err latents {latents:.2e}, decoded {decoded:.2e}, image {image:.2e}");
    assert!(latents <= 1e-4, "{case}: final latents differ from diffusers: {latents:.3e}");
    assert!(decoded <= 1e-4, "{case}: decoded pixels differ from diffusers: {decoded:.3e}");
    assert!(image <= 1e-4, "{case}: the pipeline's image differs from diffusers: {image:.3e}");
}

#[test]
fn flow_dpm_solver_matches_diffusers_from_prompt_to_pixels() {
    check_case("dpm", spec());
}

#[test]
fn flow_euler_matches_diffusers_from_prompt_to_pixels() {
    let mut spec = spec();
    spec.scheduler.kind = "flow-euler".into();
    check_case("euler", spec);
}

/// SANA-Sprint: sCM in TrigFlow time with the guidance embedded (no CFG batch), one step.
#[test]
fn sprint_scm_matches_diffusers_from_prompt_to_pixels() {
    let spec = PipelineSpec::load(&goldens().join("sana-tiny-sprint.toml")).expect("spec");
    check_case("sprint", spec);
}

#[test]
fn generate_is_the_seeded_noise_through_the_same_path() {
    let pipe = load(spec());
    let request = ImageRequest::new("a red fox").steps(2).seed(5).size(32, 64);
    let images = pipe.generate(&request, &mut |_| Flow::Continue).unwrap();
    assert_eq!((images[0].width(), images[0].height()), (32, 64));
    let (c, h, w) = pipe.latent_shape(32, 64);
    let noise = visgen::weights::random::seeded_normal(5, (1, c, h, w), &Device::Cpu).unwrap();
    let out = pipe.generate_from_latents(&request, noise, &mut |_| Flow::Continue).unwrap();
    assert_eq!(out.latents.dtype(), DType::F32);
    assert_eq!(to_images(&out.pixels).unwrap()[0].as_raw(), images[0].as_raw());
    // latents that do not fit the requested size are refused
    let wrong = Tensor::zeros((1, c, h + 1, w), DType::F32, &Device::Cpu).unwrap();
    let err = pipe.generate_from_latents(&request, wrong, &mut |_| Flow::Continue).unwrap_err();
    assert_eq!(err.exit_code(), 2, "{err}");
}

// ---- the `gen` binary ----

fn gen(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_gen")).args(args).output().expect("run gen");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// A fresh, empty folder under the system temp dir.
fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("visgen_sana_pipeline_{}_{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let target = to.join(path.file_name().unwrap());
        if path.is_dir() {
            copy_dir(&path, &target);
        } else {
            std::fs::copy(&path, &target).unwrap();
        }
    }
}

/// The spec and its folder copied into a temp dir; returns the spec path there.
fn copy_pipeline(dir: &Path) -> PathBuf {
    copy_dir(&goldens().join("sana_tiny_pipeline"), &dir.join("sana_tiny_pipeline"));
    let spec = dir.join("sana-tiny-pipeline.toml");
    std::fs::copy(goldens().join("sana-tiny-pipeline.toml"), &spec).unwrap();
    spec
}

#[test]
fn cli_makes_a_png_from_the_local_folder() {
    let dir = temp_dir("png");
    let out = dir.join("fox.png");
    let spec = goldens().join("sana-tiny-pipeline.toml");
    let (code, err) = gen(&[
        "image",
        "--model",
        spec.to_str().unwrap(),
        "--prompt",
        "a red fox in the snow",
        "--steps",
        "2",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let png = image::open(&out).expect("a readable PNG").to_rgb8();
    assert_eq!((png.width(), png.height()), (96, 64), "the spec's default size");
    let first = png.get_pixel(0, 0);
    assert!(png.pixels().any(|p| p != first), "a flat picture: nothing reached the pixels");
    std::fs::remove_dir_all(&dir).unwrap();
}

fn assert_weights_error(spec: &Path, needles: &[&str]) {
    let out = spec.with_file_name("out.png");
    let (code, err) =
        gen(&["image", "--model", spec.to_str().unwrap(), "--prompt", "a fox", "--out", out.to_str().unwrap()]);
    assert_eq!(code, 2, "stderr: {err}");
    for needle in needles {
        assert!(err.contains(needle), "stderr should name `{needle}`: {err}");
    }
    assert!(!err.contains("panicked"), "{err}");
    assert!(!err.contains("tensor ``"), "an empty tensor name in the message: {err}");
    assert!(!out.exists(), "a failed run must not leave an output file");
}

#[test]
fn cli_names_a_truncated_weight_file() {
    let dir = temp_dir("truncated");
    let spec = copy_pipeline(&dir);
    let file = dir.join("sana_tiny_pipeline/transformer/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    assert_weights_error(&spec, &["transformer/diffusion_pytorch_model.safetensors"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn cli_names_a_missing_weight_file() {
    let dir = temp_dir("missing_file");
    let spec = copy_pipeline(&dir);
    std::fs::remove_file(dir.join("sana_tiny_pipeline/vae/diffusion_pytorch_model.safetensors")).unwrap();
    assert_weights_error(&spec, &["sana_tiny_pipeline/vae", "diffusion_pytorch_model.safetensors"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn cli_names_a_missing_tensor_and_its_file() {
    let dir = temp_dir("missing_tensor");
    let spec = copy_pipeline(&dir);
    let file = dir.join("sana_tiny_pipeline/text_encoder/model.safetensors");
    let dropped = "layers.1.mlp.down_proj.weight";
    let tensors = candle_core::safetensors::load(&file, &Device::Cpu).unwrap();
    assert!(tensors.contains_key(dropped), "the golden folder changed: no {dropped}");
    let kept: HashMap<String, Tensor> = tensors.into_iter().filter(|(k, _)| k != dropped).collect();
    candle_core::safetensors::save(&kept, &file).unwrap();
    assert_weights_error(&spec, &["text_encoder/model.safetensors", dropped]);
    std::fs::remove_dir_all(&dir).unwrap();
}
