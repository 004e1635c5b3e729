//! `gen`: the visgen command line. Thin: parse, build a request, call a pipeline, write the output.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use visgen::pipelines::{request::parse_dtype, DeviceChoice, Flow, ImageRequest, LoadOptions, Pipeline, Progress, Stage};
use visgen::{Error, Result};

#[derive(Parser)]
#[command(name = "gen", version, about = "Visual generation with diffusion transformers; attention chosen per layer")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate an image from a prompt.
    Image(ImageArgs),
    /// Generate a video from a prompt.
    Video(VideoArgs),
    /// List the pipeline specs, one line each.
    Models,
    /// Attention micro-benchmarks and device checks.
    Bench(BenchArgs),
    /// Score a model on a benchmark.
    #[command(subcommand)]
    Eval(EvalCommand),
}

#[derive(Subcommand)]
enum EvalCommand {
    /// Compositional shapes benchmark: attribute binding, spatial relations, counting, scored from
    /// the pixels (color segmentation and blob geometry).
    Shapes(EvalShapesArgs),
}

#[derive(Args)]
struct EvalShapesArgs {
    #[arg(long, short, default_value = DEFAULT_MODEL)]
    model: String,
    /// Number of prompts (cycling through the four categories).
    #[arg(long, default_value_t = 100)]
    n: usize,
    /// Seed of the prompt set; prompt i is generated with seed + i.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long)]
    steps: Option<usize>,
    #[arg(long)]
    cfg: Option<f64>,
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Args, Clone)]
struct GenerateArgs {
    /// What to draw.
    #[arg(long, short)]
    prompt: String,
    /// What to steer away from (classifier-free guidance).
    #[arg(long)]
    negative_prompt: Option<String>,
    /// A spec name (see `gen models`) or a path to a spec file.
    #[arg(long, short, default_value = DEFAULT_MODEL)]
    model: String,
    /// Denoising steps (default: the spec's).
    #[arg(long)]
    steps: Option<usize>,
    /// Guidance scale (default: the spec's).
    #[arg(long)]
    cfg: Option<f64>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long)]
    width: Option<usize>,
    #[arg(long)]
    height: Option<usize>,
    /// Generate at exactly --width x --height instead of SANA's closest trained size resized to it
    /// (diffusers' `use_resolution_binning=False`).
    #[arg(long)]
    no_resolution_binning: bool,
    /// cpu, cuda or cuda:N
    #[arg(long, default_value = "cpu")]
    device: String,
    /// f32, f16 or bf16 (default: the spec's)
    #[arg(long)]
    dtype: Option<String>,
    /// Per-layer attention override LAYER=BACKEND[,key=value...], e.g. `self=dense`,
    /// `0-3=neighborhood,kernel=7x7`. Repeatable; later ones win.
    #[arg(long = "attention", value_name = "LAYER=BACKEND")]
    attention: Vec<String>,
    /// Run every denoising step eagerly instead of replaying it from a CUDA graph (the result is
    /// the same; graphs only cut launch overhead). Also: VISGEN_CUDA_GRAPHS=0.
    #[arg(long)]
    no_cuda_graphs: bool,
}

#[derive(Args)]
struct ImageArgs {
    #[command(flatten)]
    common: GenerateArgs,
    /// Output file (.png or .jpg).
    #[arg(long, short, default_value = "out.png")]
    out: PathBuf,
}

#[derive(Args)]
struct VideoArgs {
    #[command(flatten)]
    common: GenerateArgs,
    #[arg(long, default_value_t = 81)]
    frames: usize,
    /// Output file (.gif, or .mp4 with the `video` feature).
    #[arg(long, short, default_value = "out.gif")]
    out: PathBuf,
}

#[derive(Args)]
struct BenchArgs {
    /// What to benchmark: a case name, or all cases when omitted.
    case: Option<String>,
    #[arg(long, default_value = "cuda")]
    device: String,
    #[arg(long, default_value_t = 20)]
    iters: usize,
    /// Baseline log from the same run (`baseline NAME: X ms` lines): print our ratio to it.
    #[arg(long)]
    baseline: Option<PathBuf>,
}

const DEFAULT_MODEL: &str = "tiny-shapes";

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Image(args) => run_image(args),
        Command::Video(args) => run_video(args),
        Command::Models => run_models(),
        Command::Bench(args) => run_bench(args),
        Command::Eval(EvalCommand::Shapes(args)) => run_eval_shapes(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code() as u8)
        }
    }
}

fn load_options(args: &GenerateArgs) -> Result<LoadOptions> {
    Ok(LoadOptions {
        device: DeviceChoice::parse(&args.device)?,
        dtype: args.dtype.as_deref().map(parse_dtype).transpose()?,
        attention: args.attention.clone(),
    })
}

fn image_request(args: &GenerateArgs) -> ImageRequest {
    ImageRequest {
        prompt: args.prompt.clone(),
        negative_prompt: args.negative_prompt.clone(),
        width: args.width,
        height: args.height,
        steps: args.steps,
        cfg: args.cfg,
        seed: args.seed,
        count: 1,
        resolution_binning: !args.no_resolution_binning,
    }
}

/// Fails before any work if the output cannot be written, so a long run is never lost.
fn check_output(path: &Path, extensions: &[&str]) -> Result<()> {
    let ext = path.extension().and_then(|e| e.to_str()).map(|e| e.to_ascii_lowercase()).unwrap_or_default();
    if !extensions.contains(&ext.as_str()) {
        return Err(Error::usage(format!(
            "output `{}`: expected a file ending in {}",
            path.display(),
            extensions.iter().map(|e| format!(".{e}")).collect::<Vec<_>>().join(" or ")
        )));
    }
    let existed = path.exists();
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .map_err(|e| Error::usage(format!("cannot write output `{}`: {e}", path.display())))?;
    if !existed {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}

fn progress_bar() -> impl FnMut(Progress) -> Flow {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{msg:>8} [{bar:30}] {pos}/{len} {elapsed_precise} eta {eta}")
            .expect("static template")
            .progress_chars("=> "),
    );
    move |p: Progress| {
        let msg = match p.stage {
            Stage::Encode => "encode",
            Stage::Denoise => "denoise",
            Stage::Decode => "decode",
        };
        bar.set_message(msg);
        bar.set_length(p.total as u64);
        bar.set_position(p.step as u64);
        if p.stage == Stage::Decode && p.step == p.total {
            bar.finish();
        }
        Flow::Continue
    }
}

fn run_image(args: ImageArgs) -> Result<()> {
    let request = image_request(&args.common);
    request.validate()?;
    check_output(&args.out, &["png", "jpg", "jpeg"])?;
    let mut pipeline = Pipeline::load(&args.common.model, &load_options(&args.common)?)?;
    if let (Pipeline::Sana(sana), true) = (&mut pipeline, args.common.no_cuda_graphs) {
        sana.set_cuda_graphs(false);
    }
    let images = pipeline.generate(&request, &mut progress_bar())?;
    let image = images.into_iter().next().ok_or_else(|| Error::Other("the pipeline returned no image".into()))?;
    image.save(&args.out).map_err(|e| Error::usage(format!("cannot write `{}`: {e}", args.out.display())))?;
    eprintln!("wrote {}", args.out.display());
    Ok(())
}

fn run_video(args: VideoArgs) -> Result<()> {
    let request = image_request(&args.common);
    request.validate()?;
    if args.frames == 0 {
        return Err(Error::usage("--frames must be at least 1"));
    }
    let formats: &[&str] = if cfg!(feature = "video") { &["gif", "mp4"] } else { &["gif"] };
    check_output(&args.out, formats)?;
    let spec = visgen::spec::find_spec(&args.common.model)?;
    Err(Error::usage(format!("`{}` is not a video model (family `{}`)", spec.name, spec.family)))
}

fn run_models() -> Result<()> {
    for spec in visgen::spec::list_specs()? {
        println!("{:<20} {:<12} {}", spec.name, spec.family, spec.description);
    }
    Ok(())
}

fn run_bench(args: BenchArgs) -> Result<()> {
    if args.iters == 0 {
        return Err(Error::usage("--iters must be at least 1"));
    }
    visgen::bench::run(&visgen::bench::BenchOptions {
        device: args.device,
        case: args.case,
        iters: args.iters,
        baseline: args.baseline,
    })
}

fn run_eval_shapes(args: EvalShapesArgs) -> Result<()> {
    if args.n == 0 {
        return Err(Error::usage("--n must be at least 1"));
    }
    if let Some(path) = &args.json {
        check_output(path, &["json"])?;
    }
    let options = LoadOptions { device: DeviceChoice::parse(&args.device)?, dtype: None, attention: Vec::new() };
    let pipeline = Pipeline::load(&args.model, &options)?;
    let prompts = visgen::data::shapes::prompt_set(args.seed, args.n);
    let bar = ProgressBar::new(args.n as u64);
    let mut images = Vec::with_capacity(args.n);
    for (i, (prompt, _category)) in prompts.iter().enumerate() {
        let request = ImageRequest {
            steps: args.steps,
            cfg: args.cfg,
            ..ImageRequest::new(prompt.clone()).seed(args.seed.wrapping_add(i as u64))
        };
        let image = pipeline.generate(&request, &mut |_| Flow::Continue)?;
        images.push(image.into_iter().next().ok_or_else(|| Error::Other("the pipeline returned no image".into()))?);
        bar.inc(1);
    }
    bar.finish_and_clear();
    let report = visgen::eval::shapes_report::evaluate_images(&prompts, &images)?;
    println!("{report}");
    if let Some(path) = &args.json {
        std::fs::write(path, report.to_json()?).map_err(|e| Error::usage(format!("cannot write `{}`: {e}", path.display())))?;
    }
    Ok(())
}
