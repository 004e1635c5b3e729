//! The whole text-to-image path on the tiny random-weight SANA spec: deterministic, sized,
//! cancellable, with progress for every step.

use visgen::pipelines::{Flow, ImageRequest, LoadOptions, Pipeline, Progress, Stage};
use visgen::Error;

fn load() -> Pipeline {
    Pipeline::load("tiny-random", &LoadOptions::default()).expect("load tiny-random")
}

fn run(pipe: &Pipeline, request: &ImageRequest) -> visgen::Result<Vec<image::RgbImage>> {
    pipe.generate(request, &mut |_| Flow::Continue)
}

#[test]
fn same_seed_same_pixels_and_the_seed_matters() {
    let pipe = load();
    let request = ImageRequest::new("a red circle").seed(3).steps(2);
    let a = run(&pipe, &request).unwrap();
    let b = run(&pipe, &request).unwrap();
    assert_eq!(a[0].as_raw(), b[0].as_raw());
    assert_eq!((a[0].width(), a[0].height()), (64, 64));
    let c = run(&pipe, &request.clone().seed(4)).unwrap();
    assert_ne!(a[0].as_raw(), c[0].as_raw());
    let d = run(&pipe, &ImageRequest::new("a blue square").seed(3).steps(2)).unwrap();
    assert_ne!(a[0].as_raw(), d[0].as_raw(), "the prompt must reach the picture");
}

#[test]
fn sizes_must_be_multiples_of_a_token() {
    let pipe = load();
    let err = run(&pipe, &ImageRequest::new("a red circle").size(60, 64)).unwrap_err();
    assert_eq!(err.exit_code(), 2, "{err}");
    assert!(err.to_string().contains("60x64"), "{err}");
    let ok = run(&pipe, &ImageRequest::new("a red circle").size(32, 96).steps(1)).unwrap();
    assert_eq!((ok[0].width(), ok[0].height()), (32, 96));
}

#[test]
fn progress_covers_every_step_and_can_cancel() {
    let pipe = load();
    let mut seen: Vec<Progress> = Vec::new();
    run_with(&pipe, 3, &mut |p| {
        seen.push(p);
        Flow::Continue
    })
    .unwrap();
    let denoise: Vec<usize> = seen.iter().filter(|p| p.stage == Stage::Denoise).map(|p| p.step).collect();
    assert_eq!(denoise, vec![0, 1, 2, 3]);
    assert_eq!(seen.last().unwrap().stage, Stage::Decode);

    let err = run_with(&pipe, 3, &mut |p| if p.stage == Stage::Denoise && p.step == 1 { Flow::Cancel } else { Flow::Continue })
        .unwrap_err();
    assert!(matches!(err, Error::Cancelled), "{err}");
}

fn run_with(pipe: &Pipeline, steps: usize, cb: &mut dyn FnMut(Progress) -> Flow) -> visgen::Result<Vec<image::RgbImage>> {
    pipe.generate(&ImageRequest::new("two green circles").steps(steps), cb)
}
