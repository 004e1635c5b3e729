"""Golden data for the flow schedulers (tests/schedulers.rs), produced by diffusers itself.

Each case runs a diffusers scheduler over fixed random model outputs and records the schedule
(timesteps, sigmas), every model output fed in, and every sample the scheduler returned, so the
Rust side can replay the same sequence and compare step by step.

Run: /work/pyenv/bin/python tests/goldens/make_scheduler_goldens.py
"""
import os

import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, SCMScheduler
from safetensors.torch import save_file

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "schedulers.safetensors")
SHAPE = (1, 4, 4, 4)  # small latent: the math is elementwise, the shape only has to be non-trivial


def dpm_case(tensors, name, shift, steps, gen):
    sched = DPMSolverMultistepScheduler(
        flow_shift=shift, use_flow_sigmas=True, prediction_type="flow_prediction"
    )
    sched.set_timesteps(steps)
    tensors[f"{name}/timesteps"] = sched.timesteps.clone().to(torch.int64)
    tensors[f"{name}/sigmas"] = sched.sigmas.clone().to(torch.float32)
    sample = torch.randn(SHAPE, generator=gen)
    tensors[f"{name}/sample_0"] = sample.clone()
    for i, t in enumerate(sched.timesteps):
        model_output = torch.randn(SHAPE, generator=gen)
        tensors[f"{name}/model_output_{i}"] = model_output.clone()
        sample = sched.step(model_output, t, sample, return_dict=False)[0]
        tensors[f"{name}/sample_{i + 1}"] = sample.clone()


def euler_case(tensors, name, shift, steps, gen):
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(steps)
    tensors[f"{name}/timesteps"] = sched.timesteps.clone().to(torch.float32)
    tensors[f"{name}/sigmas"] = sched.sigmas.clone().to(torch.float32)
    sample = torch.randn(SHAPE, generator=gen)
    noise = torch.randn(SHAPE, generator=gen)
    tensors[f"{name}/noise"] = noise.clone()
    tensors[f"{name}/sample_0"] = sample.clone()
    # scale_noise at the first and at a middle step (img2img / strength use)
    mid = steps // 2
    for idx in sorted({0, mid}):
        sched_for_noise = FlowMatchEulerDiscreteScheduler(shift=shift)
        sched_for_noise.set_timesteps(steps)
        sched_for_noise.set_begin_index(idx)
        t = sched_for_noise.timesteps[idx : idx + 1]
        tensors[f"{name}/scaled_noise_{idx}"] = sched_for_noise.scale_noise(sample, t, noise).clone()
    for i, t in enumerate(sched.timesteps):
        model_output = torch.randn(SHAPE, generator=gen)
        tensors[f"{name}/model_output_{i}"] = model_output.clone()
        sample = sched.step(model_output, t, sample, return_dict=False)[0]
        tensors[f"{name}/sample_{i + 1}"] = sample.clone()


def scm_case(tensors, name, steps, intermediate, gen, sigma_data=0.5, max_t=1.57080):
    """Replays SanaSprintPipeline's loop around SCMScheduler.step, with the noise recorded.

    The transformer is replaced by a fixed random flow prediction per step; everything the
    pipeline does around it (TrigFlow <-> flow conversion, scaling by sigma_data) is kept.
    """
    sched = SCMScheduler(sigma_data=sigma_data)
    sched.set_timesteps(steps, max_timesteps=max_t, intermediate_timesteps=intermediate)
    sched.set_begin_index(0)
    tensors[f"{name}/timesteps"] = sched.timesteps.clone().to(torch.float32)
    latents = torch.randn(SHAPE, generator=gen) * sigma_data
    tensors[f"{name}/sample_0"] = latents.clone()
    for i, t in enumerate(sched.timesteps[:-1]):
        timestep = t.expand(latents.shape[0])
        scm_t = torch.sin(timestep) / (torch.cos(timestep) + torch.sin(timestep))
        scm_t_e = scm_t.view(-1, 1, 1, 1)
        model_in = (latents / sigma_data) * torch.sqrt(scm_t_e**2 + (1 - scm_t_e) ** 2)
        flow_pred = torch.randn(SHAPE, generator=gen)
        trig = ((1 - 2 * scm_t_e) * model_in + (1 - 2 * scm_t_e + 2 * scm_t_e**2) * flow_pred) / torch.sqrt(
            scm_t_e**2 + (1 - scm_t_e) ** 2
        )
        trig = trig.float() * sigma_data
        step_gen = torch.Generator().manual_seed(1000 + i)
        noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1000 + i)) * sigma_data
        latents, denoised = sched.step(trig, timestep, latents, generator=step_gen, return_dict=False)
        tensors[f"{name}/model_time_{i}"] = scm_t.clone().float()
        tensors[f"{name}/model_input_{i}"] = model_in.clone()
        tensors[f"{name}/flow_pred_{i}"] = flow_pred.clone()
        tensors[f"{name}/trigflow_output_{i}"] = trig.clone()
        tensors[f"{name}/noise_{i}"] = noise.clone()  # already multiplied by sigma_data
        tensors[f"{name}/denoised_{i}"] = denoised.clone()
        tensors[f"{name}/sample_{i + 1}"] = latents.clone()


def save_configs():
    """scheduler_config.json files as diffusers writes them, for the config parser."""
    root = os.path.join(os.path.dirname(OUT), "scheduler_configs")
    DPMSolverMultistepScheduler(flow_shift=3.0, use_flow_sigmas=True, prediction_type="flow_prediction").save_config(
        os.path.join(root, "sana_dpm")
    )
    DPMSolverMultistepScheduler(flow_shift=8.0, use_flow_sigmas=True, prediction_type="flow_prediction").save_config(
        os.path.join(root, "sana_video_dpm")
    )
    DPMSolverMultistepScheduler().save_config(os.path.join(root, "plain_dpm"))  # epsilon: must be refused
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_config(os.path.join(root, "euler"))
    SCMScheduler().save_config(os.path.join(root, "scm"))


def main():
    gen = torch.Generator().manual_seed(20241010)
    tensors = {}
    for steps in (1, 2, 5, 20, 28):
        dpm_case(tensors, f"dpm_shift3_n{steps}", 3.0, steps, gen)
    dpm_case(tensors, "dpm_shift8_n50", 8.0, 50, gen)  # SANA-Video default shift
    dpm_case(tensors, "dpm_shift6_n20", 6.0, 20, gen)  # SANA 4K shift
    for steps in (1, 5, 20):
        euler_case(tensors, f"euler_shift3_n{steps}", 3.0, steps, gen)
    euler_case(tensors, "euler_shift8_n28", 8.0, 28, gen)
    euler_case(tensors, "euler_shift1_n10", 1.0, 10, gen)
    scm_case(tensors, "scm_n2_inter", 2, 1.3, gen)  # SANA-Sprint default
    scm_case(tensors, "scm_n1", 1, None, gen)
    scm_case(tensors, "scm_n4", 4, None, gen)
    save_configs()
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    save_file(tensors, OUT)
    print(f"wrote {len(tensors)} tensors to {OUT} ({os.path.getsize(OUT)} bytes)")


if __name__ == "__main__":
    main()
