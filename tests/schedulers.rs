//! Flow schedulers against diffusers 0.42.1 goldens (tests/goldens/make_scheduler_goldens.py):
//! schedules (timesteps, sigmas) and every intermediate sample of a replayed trajectory.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use visgen::schedulers::{
    FlowDpmSolver, FlowDpmSolverConfig, FlowEuler, FlowEulerConfig, Scheduler, ScmConfig, ScmScheduler,
};

fn goldens() -> HashMap<String, Tensor> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/goldens/schedulers.safetensors");
    candle_core::safetensors::load(path, &Device::Cpu).expect("scheduler goldens")
}

fn get<'a>(g: &'a HashMap<String, Tensor>, key: &str) -> &'a Tensor {
    g.get(key).unwrap_or_else(|| panic!("golden tensor {key} missing"))
}

fn values_f64(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap()
}

/// max |a - b| / max |b|: relative to the scale of the reference tensor.
fn max_rel_err(actual: &Tensor, expected: &Tensor) -> f64 {
    assert_eq!(actual.dims(), expected.dims());
    let a = actual
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let b = expected
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let scale = b.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-12);
    a.iter().zip(&b).fold(0f64, |m, (x, y)| m.max((x - y).abs())) / scale
}

fn assert_close_list(name: &str, actual: &[f64], expected: &[f64], tol: f64) {
    assert_eq!(actual.len(), expected.len(), "{name}: length");
    for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
        let err = (a - e).abs() / e.abs().max(1e-12);
        assert!(
            err <= tol || (a - e).abs() <= 1e-12,
            "{name}[{i}]: {a} vs {e} (rel {err:e})"
        );
    }
}

fn replay(g: &HashMap<String, Tensor>, name: &str, scheduler: &mut dyn Scheduler) {
    let mut sample = get(g, &format!("{name}/sample_0")).clone();
    for i in 0..scheduler.num_steps() {
        let v = get(g, &format!("{name}/model_output_{i}"));
        sample = scheduler.step(v, i, &sample).unwrap();
        let err = max_rel_err(&sample, get(g, &format!("{name}/sample_{}", i + 1)));
        assert!(err <= 1e-4, "{name}: sample after step {i}: max rel err {err:e}");
    }
}

#[test]
fn flow_dpm_solver_matches_diffusers() {
    let g = goldens();
    let cases = [(3.0, 1), (3.0, 2), (3.0, 5), (3.0, 20), (3.0, 28), (8.0, 50), (6.0, 20)];
    for (shift, steps) in cases {
        let name = format!("dpm_shift{}_n{steps}", shift as i64);
        let mut sched = FlowDpmSolver::new(
            FlowDpmSolverConfig {
                flow_shift: shift,
                ..Default::default()
            },
            steps,
        )
        .unwrap();
        // timesteps are integers: they must be exactly equal
        let expected_t: Vec<i64> = get(&g, &format!("{name}/timesteps")).to_vec1::<i64>().unwrap();
        assert_eq!(sched.timesteps_i64(), expected_t, "{name}: timesteps");
        assert_close_list(
            &name,
            sched.sigmas(),
            &values_f64(get(&g, &format!("{name}/sigmas"))),
            1e-6,
        );
        replay(&g, &name, &mut sched);
        // a second trajectory after reset must start from a clean history
        sched.reset();
        replay(&g, &name, &mut sched);
    }
}

#[test]
fn flow_dpm_solver_rejects_out_of_order_steps() {
    let g = goldens();
    let mut sched = FlowDpmSolver::new(FlowDpmSolverConfig::default(), 20).unwrap();
    let x = get(&g, "dpm_shift3_n20/sample_0");
    assert!(sched.step(x, 1, x).is_err());
    assert!(FlowDpmSolver::new(FlowDpmSolverConfig::default(), 0).is_err());
}

#[test]
fn flow_euler_matches_diffusers() {
    let g = goldens();
    for (shift, steps) in [(3.0, 1), (3.0, 5), (3.0, 20), (8.0, 28), (1.0, 10)] {
        let name = format!("euler_shift{}_n{steps}", shift as i64);
        let mut sched = FlowEuler::new(
            FlowEulerConfig {
                shift,
                ..Default::default()
            },
            steps,
        )
        .unwrap();
        assert_close_list(
            &name,
            sched.timesteps(),
            &values_f64(get(&g, &format!("{name}/timesteps"))),
            1e-6,
        );
        assert_close_list(
            &name,
            sched.sigmas(),
            &values_f64(get(&g, &format!("{name}/sigmas"))),
            1e-6,
        );
        let sample = get(&g, &format!("{name}/sample_0"));
        let noise = get(&g, &format!("{name}/noise"));
        for idx in [0, steps / 2] {
            let scaled = sched.scale_noise(sample, noise, idx).unwrap();
            let err = max_rel_err(&scaled, get(&g, &format!("{name}/scaled_noise_{idx}")));
            assert!(err <= 1e-6, "{name}: scale_noise at {idx}: {err:e}");
        }
        replay(&g, &name, &mut sched);
    }
}

#[test]
fn scm_matches_sana_sprint_loop() {
    let g = goldens();
    let cases = [("scm_n2_inter", 2, Some(1.3)), ("scm_n1", 1, None), ("scm_n4", 4, None)];
    for (name, steps, mid) in cases {
        let config = ScmConfig {
            intermediate_timesteps: mid,
            ..Default::default()
        };
        let scm = ScmScheduler::new(config, steps).unwrap();
        assert_close_list(
            name,
            scm.all_times(),
            &values_f64(get(&g, &format!("{name}/timesteps"))),
            1e-6,
        );
        let sigma_data = scm.config().sigma_data;
        let mut x = get(&g, &format!("{name}/sample_0")).clone();
        for i in 0..scm.num_steps() {
            let s = scm.timesteps()[i];
            let t_flow = ScmScheduler::model_time(s);
            let expected_t = values_f64(get(&g, &format!("{name}/model_time_{i}")))[0];
            assert!(
                (t_flow - expected_t).abs() <= 1e-6,
                "{name}: model time {t_flow} vs {expected_t}"
            );
            let x_in = scm.model_input(&x, s).unwrap();
            let err = max_rel_err(&x_in, get(&g, &format!("{name}/model_input_{i}")));
            assert!(err <= 1e-5, "{name}: model input {i}: {err:e}");
            let v = get(&g, &format!("{name}/flow_pred_{i}"));
            let f = scm.trigflow_output(&x_in, v, s).unwrap();
            let err = max_rel_err(&f, get(&g, &format!("{name}/trigflow_output_{i}")));
            assert!(err <= 1e-4, "{name}: trigflow output {i}: {err:e}");
            // the golden noise already carries the sigma_data factor; the API takes it standard
            let z = (get(&g, &format!("{name}/noise_{i}")) / sigma_data).unwrap();
            let out = scm.step(&f, i, &x, &z).unwrap();
            let err = max_rel_err(&out.denoised, get(&g, &format!("{name}/denoised_{i}")));
            assert!(err <= 1e-4, "{name}: denoised {i}: {err:e}");
            let err = max_rel_err(&out.prev_sample, get(&g, &format!("{name}/sample_{}", i + 1)));
            assert!(err <= 1e-4, "{name}: sample {}: {err:e}", i + 1);
            x = out.prev_sample;
        }
    }
    assert!(
        ScmScheduler::new(ScmConfig::default(), 3).is_err(),
        "intermediate time with 3 steps"
    );
}

fn config_file(name: &str) -> String {
    let path = format!(
        "{}/tests/goldens/scheduler_configs/{name}/scheduler_config.json",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read_to_string(path).unwrap()
}

#[test]
fn diffusers_scheduler_configs_are_read() {
    use visgen::schedulers::SchedulerConfig;
    let parse = |name: &str| SchedulerConfig::from_diffusers_json(&config_file(name), name);
    assert_eq!(
        parse("sana_dpm").unwrap(),
        SchedulerConfig::FlowDpmSolver(FlowDpmSolverConfig {
            flow_shift: 3.0,
            num_train_timesteps: 1000
        })
    );
    assert_eq!(
        parse("sana_video_dpm").unwrap(),
        SchedulerConfig::FlowDpmSolver(FlowDpmSolverConfig {
            flow_shift: 8.0,
            num_train_timesteps: 1000
        })
    );
    assert_eq!(
        parse("euler").unwrap(),
        SchedulerConfig::FlowEuler(FlowEulerConfig {
            shift: 3.0,
            num_train_timesteps: 1000
        })
    );
    assert_eq!(parse("scm").unwrap(), SchedulerConfig::Scm(ScmConfig::default()));
    // an epsilon-prediction DPM-Solver would sample wrongly: refused, naming the config
    match parse("plain_dpm") {
        Err(visgen::Error::Spec { file, .. }) => assert_eq!(file, "plain_dpm"),
        other => panic!("expected a spec error, got {other:?}"),
    }
    // the boxed scheduler is the same algorithm as the direct one
    let mut boxed = parse("sana_dpm").unwrap().flow_scheduler(20).unwrap();
    assert_eq!(
        boxed.timesteps(),
        FlowDpmSolver::new(FlowDpmSolverConfig::sana(), 20).unwrap().timesteps()
    );
    replay(&goldens(), "dpm_shift3_n20", boxed.as_mut());
    assert!(parse("scm").unwrap().flow_scheduler(2).is_err());
    let karras = config_file("sana_dpm").replace("\"use_karras_sigmas\": false", "\"use_karras_sigmas\": true");
    assert!(SchedulerConfig::from_diffusers_json(&karras, "k").is_err());
}
