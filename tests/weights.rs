//! Weight resolution and loading: a local diffusers folder, sharded safetensors, variants, the hub
//! cache found offline, and the errors for missing / truncated / mismatched weights.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Module, Tensor};
use visgen::weights::{HubConfig, ModelRepo, ModelSource, WeightFiles, Weights};
use visgen::Error;

fn tmpdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("visgen-weights-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

fn save(path: &Path, tensors: &[(&str, Vec<f32>, Vec<usize>)]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let map: std::collections::HashMap<String, Tensor> = tensors
        .iter()
        .map(|(n, v, s)| {
            (
                n.to_string(),
                Tensor::from_vec(v.clone(), s.as_slice(), &Device::Cpu).unwrap(),
            )
        })
        .collect();
    candle_core::safetensors::save(&map, path).unwrap();
}

const W: [f32; 6] = [0.5, -1.0, 2.0, 0.25, 3.0, -0.75]; // (2, 3)
const B: [f32; 2] = [0.1, -0.2];

/// A tiny folder laid out like a SANA diffusers repo.
fn diffusers_folder(root: &Path) {
    write(
        &root.join("model_index.json"),
        r#"{"_class_name": "SanaPipeline", "_diffusers_version": "0.42.1",
            "scheduler": ["diffusers", "DPMSolverMultistepScheduler"], "text_encoder": ["transformers", "Gemma2Model"],
            "tokenizer": ["transformers", "GemmaTokenizerFast"], "transformer": ["diffusers", "SanaTransformer2DModel"],
            "vae": ["diffusers", "AutoencoderDC"]}"#,
    );
    write(
        &root.join("transformer/config.json"),
        r#"{"_class_name": "SanaTransformer2DModel"}"#,
    );
    save(
        &root.join("transformer/diffusion_pytorch_model.safetensors"),
        &[
            ("proj.weight", W.to_vec(), vec![2, 3]),
            ("proj.bias", B.to_vec(), vec![2]),
        ],
    );
    // the text encoder in two shards
    write(&root.join("text_encoder/config.json"), r#"{"model_type": "gemma2"}"#);
    save(
        &root.join("text_encoder/model-00001-of-00002.safetensors"),
        &[("embed.weight", vec![1.0, 2.0, 3.0, 4.0], vec![2, 2])],
    );
    save(
        &root.join("text_encoder/model-00002-of-00002.safetensors"),
        &[("norm.weight", vec![5.0, 6.0], vec![2])],
    );
    write(
        &root.join("text_encoder/model.safetensors.index.json"),
        r#"{"metadata": {"total_size": 24}, "weight_map": {"embed.weight": "model-00001-of-00002.safetensors",
            "norm.weight": "model-00002-of-00002.safetensors"}}"#,
    );
    // the VAE in a plain and a bf16 variant with different contents
    write(&root.join("vae/config.json"), r#"{"_class_name": "AutoencoderDC"}"#);
    save(
        &root.join("vae/diffusion_pytorch_model.safetensors"),
        &[("scale", vec![1.0], vec![1])],
    );
    save(
        &root.join("vae/diffusion_pytorch_model.bf16.safetensors"),
        &[("scale", vec![2.0], vec![1])],
    );
    write(&root.join("tokenizer/tokenizer.json"), r#"{"version": "1.0"}"#);
    write(
        &root.join("tokenizer/tokenizer_config.json"),
        r#"{"pad_token": "<pad>"}"#,
    );
    write(
        &root.join("scheduler/scheduler_config.json"),
        r#"{"flow_shift": 3.0, "use_flow_sigmas": true}"#,
    );
}

fn linear(weights: &Weights, dtype: DType) -> visgen::Result<candle_nn::Linear> {
    weights.build(dtype, &Device::Cpu, |vb| Ok(candle_nn::linear(3, 2, vb.pp("proj"))?))
}

#[test]
fn local_diffusers_folder() {
    let root = tmpdir("folder");
    diffusers_folder(&root);
    let source = ModelSource::parse(root.to_str().unwrap()).unwrap();
    assert_eq!(source, ModelSource::Folder(root.clone()));
    let repo = ModelRepo::open(&source, &HubConfig::from_env()).unwrap();
    let index = repo.model_index().unwrap();
    assert_eq!(index.class_name.as_deref(), Some("SanaPipeline"));
    assert_eq!(
        index.components["transformer"].1.as_deref(),
        Some("SanaTransformer2DModel")
    );
    assert_eq!(index.components.len(), 5);
    assert_eq!(
        repo.component_config("scheduler").unwrap(),
        root.join("scheduler/scheduler_config.json")
    );
    assert_eq!(
        repo.tokenizer_json("tokenizer").unwrap(),
        root.join("tokenizer/tokenizer.json")
    );

    let files = repo.component_weights("transformer", None).unwrap();
    assert_eq!(
        files,
        WeightFiles::Single(root.join("transformer/diffusion_pytorch_model.safetensors"))
    );
    let weights = Weights::open(&files).unwrap();
    let layer = linear(&weights, DType::F32).unwrap();
    let x = Tensor::new(&[[1.0f32, 2.0, 3.0]], &Device::Cpu).unwrap();
    let y = layer.forward(&x).unwrap().to_vec2::<f32>().unwrap();
    // by hand: W·x + b
    let expected = [0.5 - 2.0 + 6.0 + 0.1, 0.25 + 6.0 - 2.25 - 0.2];
    for (a, e) in y[0].iter().zip(expected) {
        assert!((a - e).abs() < 1e-6, "{a} vs {e}");
    }
    // dtype conversion on load
    let w16 = weights.load("proj.weight", DType::F16, &Device::Cpu).unwrap();
    assert_eq!(w16.dtype(), DType::F16);
    let wb = weights.load("proj.weight", DType::BF16, &Device::Cpu).unwrap();
    let wb: Vec<f32> = wb
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let expected_bf16: Vec<f32> = W.iter().map(|v| half::bf16::from_f32(*v).to_f32()).collect();
    assert_eq!(wb, expected_bf16);
}

#[test]
fn sharded_index_and_variants() {
    let root = tmpdir("sharded");
    diffusers_folder(&root);
    let repo = ModelRepo::open(&ModelSource::Folder(root.clone()), &HubConfig::from_env()).unwrap();
    match repo.component_weights("text_encoder", None).unwrap() {
        WeightFiles::Sharded { index, shards } => {
            assert_eq!(index, root.join("text_encoder/model.safetensors.index.json"));
            assert_eq!(shards.len(), 2);
        }
        other => panic!("expected shards, got {other:?}"),
    }
    let te = repo.open_weights("text_encoder", None).unwrap();
    assert_eq!(te.tensor_names(), vec!["embed.weight", "norm.weight"]);
    let norm: Vec<f32> = te
        .load("norm.weight", DType::F32, &Device::Cpu)
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(norm, vec![5.0, 6.0]);
    let embed = te
        .load("embed.weight", DType::F32, &Device::Cpu)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    assert_eq!(embed, vec![vec![1.0, 2.0], vec![3.0, 4.0]]);

    let scale = |variant| -> f32 {
        let w = repo.open_weights("vae", variant).unwrap();
        w.load("scale", DType::F32, &Device::Cpu)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()[0]
    };
    assert_eq!(scale(None), 1.0);
    assert_eq!(scale(Some("bf16")), 2.0);
    assert_eq!(
        scale(Some("fp16")),
        1.0,
        "a missing variant falls back to the plain file"
    );

    // a single safetensors file as the whole source
    let file = root.join("transformer/diffusion_pytorch_model.safetensors");
    let single = ModelSource::parse(file.to_str().unwrap()).unwrap();
    assert_eq!(single, ModelSource::File(file.clone()));
    let repo = ModelRepo::open(&single, &HubConfig::from_env()).unwrap();
    assert_eq!(
        repo.component_weights("transformer", None).unwrap(),
        WeightFiles::Single(file)
    );
}

#[cfg(unix)]
#[test]
fn hub_cache_found_offline() {
    // laid out as huggingface_hub writes it: blobs, relative symlinks in snapshots, refs/main
    let cache = tmpdir("hubcache");
    let repo_dir = cache.join("models--Efficient-Large-Model--Tiny_Sana_diffusers");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let staging = tmpdir("hubstaging");
    diffusers_folder(&staging);
    let snapshot = repo_dir.join("snapshots").join(commit);
    for rel in [
        "model_index.json",
        "transformer/diffusion_pytorch_model.safetensors",
        "transformer/config.json",
        "tokenizer/tokenizer.json",
    ] {
        let blob_name = format!("blob{}", rel.len());
        let blob = repo_dir.join("blobs").join(&blob_name);
        std::fs::create_dir_all(blob.parent().unwrap()).unwrap();
        std::fs::copy(staging.join(rel), &blob).unwrap();
        let link = snapshot.join(rel);
        std::fs::create_dir_all(link.parent().unwrap()).unwrap();
        let depth = rel.matches('/').count() + 2; // up to the repo folder
        let target = format!("{}blobs/{blob_name}", "../".repeat(depth));
        std::os::unix::fs::symlink(target, &link).unwrap();
    }
    write(&repo_dir.join("refs/main"), commit);

    let cache_str = cache.to_string_lossy().into_owned();
    let hub = HubConfig::from_vars(|name| match name {
        "HF_HUB_CACHE" => Some(cache_str.clone()),
        "HF_HUB_OFFLINE" => Some("1".into()),
        "HF_TOKEN" => Some("hf_test_token".into()),
        _ => None,
    });
    assert_eq!(hub.cache_dir, cache);
    assert!(hub.offline);
    assert_eq!(hub.token.as_deref(), Some("hf_test_token"));

    let source = ModelSource::parse("Efficient-Large-Model/Tiny_Sana_diffusers").unwrap();
    let repo = ModelRepo::open(&source, &hub).unwrap();
    assert_eq!(repo.model_index().unwrap().class_name.as_deref(), Some("SanaPipeline"));
    let files = repo.component_weights("transformer", None).unwrap();
    assert_eq!(
        files,
        WeightFiles::Single(snapshot.join("transformer/diffusion_pytorch_model.safetensors"))
    );
    assert!(linear(&Weights::open(&files).unwrap(), DType::F32).is_ok());
    assert!(repo.tokenizer_json("tokenizer").is_ok());

    // a commit hash as the revision resolves without a ref
    let pinned = ModelSource::parse(&format!("Efficient-Large-Model/Tiny_Sana_diffusers@{commit}")).unwrap();
    assert!(ModelRepo::open(&pinned, &hub).unwrap().model_index().is_ok());
    // offline, anything not cached is a weights error naming the file; nothing is fetched
    let err = repo.file("vae/diffusion_pytorch_model.safetensors").unwrap_err();
    assert!(matches!(err, Error::Weights { .. }), "{err}");
    assert!(
        err.to_string().contains("vae/diffusion_pytorch_model.safetensors") && err.to_string().contains("OFFLINE"),
        "{err}"
    );
    assert!(matches!(
        repo.component_weights("vae", None),
        Err(Error::Weights { .. })
    ));
    let other_rev = ModelSource::parse("Efficient-Large-Model/Tiny_Sana_diffusers@v2").unwrap();
    assert!(ModelRepo::open(&other_rev, &hub).unwrap().model_index().is_err());
    let unknown = ModelSource::parse("nobody/nothing").unwrap();
    assert!(matches!(
        ModelRepo::open(&unknown, &hub).unwrap().model_index(),
        Err(Error::Weights { .. })
    ));
}

fn expect_weights_error(result: visgen::Result<impl std::fmt::Debug>, file_part: &str, tensor: &str, msg_part: &str) {
    match result {
        Err(err @ Error::Weights { .. }) => {
            let Error::Weights { file, tensor: t, msg } = &err else {
                unreachable!()
            };
            assert!(file.contains(file_part), "file `{file}` should name `{file_part}`");
            assert_eq!(t, tensor, "tensor in {err}");
            assert!(msg.contains(msg_part), "message `{msg}` should say `{msg_part}`");
            assert_eq!(err.exit_code(), 2);
        }
        other => panic!("expected a weights error, got {other:?}"),
    }
}

#[test]
fn weight_errors_name_file_and_tensor() {
    let root = tmpdir("errors");
    diffusers_folder(&root);
    let repo = ModelRepo::open(&ModelSource::Folder(root.clone()), &HubConfig::from_env()).unwrap();

    // missing file: a component without weights
    std::fs::create_dir_all(root.join("controlnet")).unwrap();
    expect_weights_error(
        repo.component_weights("controlnet", None),
        "controlnet",
        "",
        "no safetensors weights",
    );

    // truncated file
    let path = root.join("transformer/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let cut = root.join("cut/diffusion_pytorch_model.safetensors");
    std::fs::create_dir_all(cut.parent().unwrap()).unwrap();
    std::fs::write(&cut, &bytes[..bytes.len() - 5]).unwrap();
    expect_weights_error(
        repo.open_weights("cut", None),
        "cut/diffusion_pytorch_model.safetensors",
        "",
        "truncated",
    );

    // missing tensor and wrong shape, met while building a model
    let weights = repo.open_weights("transformer", None).unwrap();
    let missing = weights.build(DType::F32, &Device::Cpu, |vb| {
        Ok(candle_nn::linear(3, 2, vb.pp("proj_out"))?)
    });
    expect_weights_error(
        missing,
        "transformer/diffusion_pytorch_model.safetensors",
        "proj_out.weight",
        "not found",
    );
    let wrong = weights.build(DType::F32, &Device::Cpu, |vb| {
        Ok(candle_nn::linear(4, 2, vb.pp("proj"))?)
    });
    expect_weights_error(
        wrong,
        "transformer/diffusion_pytorch_model.safetensors",
        "proj.weight",
        "[2, 3]",
    );

    // a probed optional tensor does not mask the real outcome
    let probed = weights.build(DType::F32, &Device::Cpu, |vb| {
        let _optional = vb.get(2, "proj.norm_q");
        Ok(candle_nn::linear(3, 2, vb.pp("proj"))?)
    });
    assert!(probed.is_ok());
    let unrelated = weights.build(DType::F32, &Device::Cpu, |vb| -> visgen::Result<()> {
        let _optional = vb.get(2, "proj.norm_q");
        Err(Error::Other("config mismatch".into()))
    });
    assert!(matches!(unrelated, Err(Error::Other(_))));

    // a shard the index names is gone; a tensor the index names is not in its shard
    std::fs::remove_file(root.join("text_encoder/model-00002-of-00002.safetensors")).unwrap();
    expect_weights_error(
        Weights::open_index(&root.join("text_encoder/model.safetensors.index.json")),
        "model-00002-of-00002",
        "norm.weight",
        "missing",
    );
    save(
        &root.join("text_encoder/model-00002-of-00002.safetensors"),
        &[("other.weight", vec![1.0], vec![1])],
    );
    expect_weights_error(
        repo.open_weights("text_encoder", None),
        "model-00002-of-00002",
        "norm.weight",
        "missing from its shard",
    );
}

#[test]
fn source_parsing() {
    assert_eq!(
        ModelSource::parse("Efficient-Large-Model/Sana_1600M_1024px_BF16_diffusers@main").unwrap(),
        ModelSource::Hub {
            repo_id: "Efficient-Large-Model/Sana_1600M_1024px_BF16_diffusers".into(),
            revision: Some("main".into())
        }
    );
    assert!(matches!(ModelSource::parse("no/such/path/here"), Err(Error::Usage(_))));
    assert!(matches!(ModelSource::parse("just-a-name"), Err(Error::Usage(_))));
    let root = tmpdir("parse");
    write(&root.join("weights.bin"), "x");
    assert!(matches!(
        ModelSource::parse(root.join("weights.bin").to_str().unwrap()),
        Err(Error::Usage(_))
    ));
}

#[test]
fn bf16_only_repo_layout_is_found_without_asking() {
    // the file names of Efficient-Large-Model/Sana_1600M_1024px_BF16_diffusers
    let root = tmpdir("bf16repo");
    save(
        &root.join("transformer/diffusion_pytorch_model.bf16.safetensors"),
        &[
            ("proj.weight", W.to_vec(), vec![2, 3]),
            ("proj.bias", B.to_vec(), vec![2]),
        ],
    );
    save(
        &root.join("text_encoder/model.bf16-00001-of-00002.safetensors"),
        &[("embed.weight", vec![1.0; 4], vec![2, 2])],
    );
    save(
        &root.join("text_encoder/model.bf16-00002-of-00002.safetensors"),
        &[("norm.weight", vec![5.0, 6.0], vec![2])],
    );
    write(
        &root.join("text_encoder/model.safetensors.index.bf16.json"),
        r#"{"metadata": {}, "weight_map": {"embed.weight": "model.bf16-00001-of-00002.safetensors",
            "norm.weight": "model.bf16-00002-of-00002.safetensors"}}"#,
    );
    let repo = ModelRepo::open(&ModelSource::Folder(root.clone()), &HubConfig::from_vars(|_| None)).unwrap();
    for variant in [None, Some("bf16")] {
        assert_eq!(
            repo.component_weights("transformer", variant).unwrap(),
            WeightFiles::Single(root.join("transformer/diffusion_pytorch_model.bf16.safetensors"))
        );
        let te = repo.open_weights("text_encoder", variant).unwrap();
        assert_eq!(te.tensor_names(), vec!["embed.weight", "norm.weight"]);
    }
    assert!(linear(&repo.open_weights("transformer", None).unwrap(), DType::BF16).is_ok());
}

#[test]
fn hub_environment_rules() {
    let home = tmpdir("hfhome");
    write(&home.join("token"), "hf_from_file\n");
    let vars = |pairs: &'static [(&'static str, &'static str)], home: PathBuf| {
        move |name: &str| -> Option<String> {
            if name == "HF_HOME" {
                return Some(home.to_string_lossy().into_owned());
            }
            pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string())
        }
    };
    // HF_HOME: cache in HF_HOME/hub, token from HF_HOME/token, online by default
    let cfg = HubConfig::from_vars(vars(&[], home.clone()));
    assert_eq!(cfg.cache_dir, home.join("hub"));
    assert_eq!(cfg.token.as_deref(), Some("hf_from_file"));
    assert!(!cfg.offline);
    // HF_HUB_CACHE and HF_TOKEN win; offline spellings as in huggingface_hub
    let cfg = HubConfig::from_vars(vars(
        &[
            ("HF_HUB_CACHE", "/x/cache"),
            ("HF_TOKEN", "hf_env"),
            ("HF_HUB_OFFLINE", "TRUE"),
        ],
        home.clone(),
    ));
    assert_eq!(cfg.cache_dir, PathBuf::from("/x/cache"));
    assert_eq!(cfg.token.as_deref(), Some("hf_env"));
    assert!(cfg.offline);
    assert!(!HubConfig::from_vars(vars(&[("HF_HUB_OFFLINE", "0")], home.clone())).offline);
    // nothing set: ~/.cache/huggingface/hub
    let cfg = HubConfig::from_vars(|name| (name == "HOME").then(|| "/home/u".to_string()));
    assert_eq!(cfg.cache_dir, PathBuf::from("/home/u/.cache/huggingface/hub"));
}

/// A minimal stand-in for the hub's HTTP API, enough for hf-hub's client: the repo info
/// (`/api/models/<repo>/revision/<rev>`) and file downloads (`/<repo>/resolve/<rev>/<file>`) with
/// the range requests, commit and etag headers it expects. Records the Authorization headers seen.
mod mock_hub {
    use std::collections::HashMap;
    use std::io::{Read, Write};
    use std::net::TcpListener;
    use std::sync::{Arc, Mutex};

    pub const COMMIT: &str = "fedcba9876543210fedcba9876543210fedcba98";

    pub struct Server {
        pub url: String,
        pub auth_headers: Arc<Mutex<Vec<String>>>,
    }

    fn respond(stream: &mut std::net::TcpStream, status: &str, headers: &[(String, String)], body: &[u8]) {
        let mut head = format!(
            "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
            body.len()
        );
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        let _ = stream.write_all(head.as_bytes());
        let _ = stream.write_all(body);
    }

    pub fn start(repo_id: &str, files: HashMap<String, Vec<u8>>) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let auth_headers = Arc::new(Mutex::new(Vec::new()));
        let seen = auth_headers.clone();
        let repo_id = repo_id.to_string();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut request = Vec::new();
                let mut buf = [0u8; 4096];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let text = String::from_utf8_lossy(&request).to_string();
                let mut lines = text.split("\r\n");
                let path = lines.next().unwrap_or("").split(' ').nth(1).unwrap_or("").to_string();
                let headers: HashMap<String, String> = lines
                    .filter_map(|l| l.split_once(':'))
                    .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
                    .collect();
                if let Some(auth) = headers.get("authorization") {
                    seen.lock().unwrap().push(auth.clone());
                }
                if path == format!("/api/models/{repo_id}/revision/main") {
                    let siblings: Vec<String> = files.keys().map(|f| format!("{{\"rfilename\": \"{f}\"}}")).collect();
                    let body = format!("{{\"sha\": \"{COMMIT}\", \"siblings\": [{}]}}", siblings.join(","));
                    respond(&mut stream, "200 OK", &[], body.as_bytes());
                    continue;
                }
                let prefix = format!("/{repo_id}/resolve/main/");
                let Some(data) = path.strip_prefix(&prefix).and_then(|f| files.get(f)) else {
                    respond(&mut stream, "404 Not Found", &[], b"");
                    continue;
                };
                let start: usize = headers
                    .get("range")
                    .and_then(|r| r.strip_prefix("bytes="))
                    .and_then(|r| r.split('-').next())
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                let one_byte = headers.get("range").map(|r| r == "bytes=0-0").unwrap_or(false);
                let end = if one_byte { 1.min(data.len()) } else { data.len() };
                let etag = format!("\"etag{:08x}\"", data.len() * 31 + path.len());
                let response_headers = vec![
                    ("x-repo-commit".to_string(), COMMIT.to_string()),
                    ("etag".to_string(), etag),
                    (
                        "content-range".to_string(),
                        format!("bytes {start}-{}/{}", end.max(1) - 1, data.len()),
                    ),
                ];
                respond(
                    &mut stream,
                    "206 Partial Content",
                    &response_headers,
                    &data[start.min(end)..end],
                );
            }
        });
        Server { url, auth_headers }
    }
}

#[test]
fn hub_download_lands_in_the_shared_cache_layout() {
    let staging = tmpdir("mockstaging");
    diffusers_folder(&staging);
    let served = [
        "model_index.json",
        "transformer/config.json",
        "transformer/diffusion_pytorch_model.safetensors",
    ];
    let files = served
        .iter()
        .map(|f| (f.to_string(), std::fs::read(staging.join(f)).unwrap()))
        .collect();
    let server = mock_hub::start("org/tiny-sana", files);

    let cache = tmpdir("mockcache");
    let online = HubConfig {
        cache_dir: cache.clone(),
        offline: false,
        token: Some("hf_secret".into()),
        endpoint: Some(server.url.clone()),
        progress: false,
    };
    let source = ModelSource::parse("org/tiny-sana").unwrap();
    let repo = ModelRepo::open(&source, &online).unwrap();
    let files = repo.component_weights("transformer", None).unwrap();
    let snapshot = cache.join("models--org--tiny-sana/snapshots").join(mock_hub::COMMIT);
    let expected = snapshot.join("transformer/diffusion_pytorch_model.safetensors");
    assert_eq!(files, WeightFiles::Single(expected.clone()));
    assert!(linear(&Weights::open(&files).unwrap(), DType::F32).is_ok());
    // Python's layout: refs/main -> commit, snapshot entries are links into blobs/
    let main_ref = std::fs::read_to_string(cache.join("models--org--tiny-sana/refs/main")).unwrap();
    assert_eq!(main_ref.trim(), mock_hub::COMMIT);
    assert!(std::fs::symlink_metadata(&expected).unwrap().file_type().is_symlink());
    assert!(server
        .auth_headers
        .lock()
        .unwrap()
        .iter()
        .all(|h| h == "Bearer hf_secret"));
    assert!(
        !server.auth_headers.lock().unwrap().is_empty(),
        "the token must be sent"
    );
    // a file the repo does not have is a weights error naming it
    assert!(matches!(
        repo.file("vae/diffusion_pytorch_model.safetensors"),
        Err(Error::Weights { .. })
    ));

    // the same cache, offline, serves what was downloaded
    let offline = HubConfig {
        offline: true,
        endpoint: None,
        ..online
    };
    let repo = ModelRepo::open(&source, &offline).unwrap();
    assert_eq!(
        repo.component_weights("transformer", None).unwrap(),
        WeightFiles::Single(expected)
    );
}
