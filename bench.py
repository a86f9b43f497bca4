"""Throughput of the training step, the UNet and the kernels, measured as ratios in one run.

    python bench.py                      # stage-1 step, three ways (CPU: tiny model; CUDA: SD1.5, 512 px, bf16)
    python bench.py --unet               # our UNet forward vs diffusers' at the same config
    python bench.py --kernels            # every kernel's table, then the step and sampling, kernels on vs off

Stage-1 step (ConceptPrism + DDLoss, ten rows), done
  reference     the authors' way: one UNet call per condition, VAE encode and "" re-encoded every step
  one_graph     all ten rows in one UNet call and one autograd graph, stop rows detached after
  ours          gradient rows in one call, stop rows in a graph-free call, the conditions a shared table
All three evaluate the same named rows (model/conditions.py) and the same loss terms
(accord_losses.py); only the way the UNet is called differs, and the two baselines live here.
Random weights (never zeros), burn-in then the median of timed steps (CUDA events on GPU).
MFU: the step's FLOPs (SD1.5 at 512 px: 0.80 TFLOP per forward row, 0.99 per input-only backward,
counted with torch's FlopCounterMode on the real config) against the device's bf16 peak.
"""
import argparse
import resource
import statistics
import time

import torch

import accord_losses
from model import clip, conditions, ops, run, unet, vae
from model.schedule import add_noise, alphas_cumprod as make_alphas_cumprod

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16 tensor-core peaks


def random_module(cls, cfg, device, dtype):
    with torch.device("meta"):
        module = cls(cfg)
    module = module.to_empty(device=device)
    with torch.no_grad():
        for name, p in module.named_parameters():
            fan_in = p[0].numel() if p.dim() > 1 else 1
            p.copy_(torch.randn(p.shape) * (1.0 / fan_in ** 0.5 if p.dim() > 1 else 0.1))
            if "norm" in name and name.endswith("weight"):
                p.add_(1.0)
    return module.to(dtype).eval().requires_grad_(False)


def timer(device):
    """Milliseconds of fn(), median of `iters` after `warmup`."""
    def measure(fn, warmup, iters):
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(iters):
            if device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1000)
        return statistics.median(times)
    return measure


def peak_tflops(device):
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def unet_flops(model_unet, latent, context, device, dtype, backward=False):
    """FLOPs of one row: forward, or forward plus the input-only backward (frozen weights)."""
    from torch.utils.flop_counter import FlopCounterMode
    x = torch.randn(1, 4, latent, latent, device=device, dtype=dtype)
    c = torch.randn(1, 77, context, device=device, dtype=dtype, requires_grad=backward)
    with FlopCounterMode(display=False) as counter:
        out = model_unet(x, torch.tensor([500], device=device), c)
        if backward:
            out.float().square().mean().backward()
    return counter.get_total_flops()


# -------------------------------------------------------------------------------------------------

def predict_per_condition(model_unet, table, rows):
    """The reference way: one UNet call per group of rows, each with its condition repeated per row."""
    eps = {}
    for name, r in rows.items():
        with torch.set_grad_enabled(r.grad and torch.is_grad_enabled()):
            eps[name] = model_unet(r.x, r.t, table[r.index()]).float()
    return eps


def predict_one_graph(model_unet, table, rows):
    """Every row in one call and one autograd graph; the stop rows detached afterwards."""
    eps = conditions.unet_on(model_unet, table, list(rows.items()))
    return {name: e if rows[name].grad else e.detach() for name, e in eps.items()}


WAYS = {"reference": predict_per_condition, "one_graph": predict_one_graph, "ours": conditions.predict}


def bench_step(args, device, dtype):
    sd15 = args.size == "sd15"
    ucfg, vcfg, ccfg = (unet.UNetConfig(), vae.VAEConfig(), clip.CLIPConfig()) if sd15 else \
        (unet.TINY, vae.TINY, clip.TINY)
    resolution = args.resolution or (512 if sd15 else 64)
    model_unet = random_module(unet.UNet, ucfg, device, dtype)
    model_vae = random_module(vae.VAE, vcfg, device, dtype)
    encoder = random_module(clip.CLIPTextEncoder, ccfg, device, dtype)
    alphas_cumprod = make_alphas_cumprod().to(device)
    width = ucfg.context_dim
    images = torch.rand(4, 3, resolution, resolution, device=device, dtype=dtype) * 2 - 1
    factor = 2 ** (len(vcfg.ch_mult) - 1)
    latent_shape = (4, resolution // factor, resolution // factor)
    vectors = torch.randn(1 + 8 * 4, width, device=device, requires_grad=True)
    ids = torch.randint(0, 49407, (3, 77), device=device)
    ids[:, 1:3] = torch.tensor([49408, 49409], device=device)  # new-token rows read the trainable vectors
    empty_ids = torch.full((1, 77), 49407, device=device)
    empty_ids[0, 0] = 49406
    with torch.no_grad():
        cached_latents = model_vae.encode(images)[0] * 0.18215
        cached_empty = encoder(empty_ids)
    gen = torch.Generator().manual_seed(0)

    def step(mode):
        t = torch.randint(0, len(alphas_cumprod), (4,), generator=gen).to(device)
        noise = torch.randn(4, *latent_shape, generator=gen).to(device, dtype)
        if mode == "reference":
            with torch.no_grad():  # the authors' code: every image and "" encoded again each step
                latents = model_vae.encode(images)[0] * 0.18215
                empty = encoder(empty_ids)
        else:
            latents, empty = cached_latents, cached_empty
        hidden = encoder(ids, extra_embeddings=vectors.to(dtype))
        table = torch.cat([hidden, empty])
        x = add_noise(latents, t, noise, alphas_cumprod)
        rows = conditions.stage1_rows(x[:1], t[:1], x[1:], t[1:], with_dd=True)
        terms = accord_losses.loss_terms(WAYS[mode](model_unet, table, rows), noise[:1], t[:1], alphas_cumprod)
        accord_losses.total(terms, {"excl": 0.05, "dd": 0.1}).backward()
        vectors.grad = None

    measure = timer(device)
    if sd15:  # the count at 512 px, scaled by pixels elsewhere (attention makes that approximate)
        fwd, bwd = 0.803e12 * (resolution / 512) ** 2, 0.99e12 * (resolution / 512) ** 2
    else:  # torch's counter (it misses the attention core on CPU, so this errs low)
        fwd = unet_flops(model_unet, resolution // factor, ucfg.context_dim, device, dtype)
        bwd = unet_flops(model_unet, resolution // factor, ucfg.context_dim, device, dtype, backward=True) - fwd
    step_flops = 10 * fwd + 5 * bwd  # ten forward rows, five with an input-only backward
    peak = peak_tflops(device)
    print(f"stage-1 step, ten rows, {args.size} UNet, {resolution} px, {str(dtype).split('.')[1]}, {device} "
          f"({torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}), torch {torch.__version__}, "
          f"{step_flops / 1e12:.3f} TFLOP per step")
    print(f"{'way':<12}{'ms/step':>10}{'rows/s':>10}{'TFLOP/s':>10}{'MFU':>8}{'peak GiB':>10}{'vs ref':>8}")
    results = {}
    for mode in args.ways.split(","):
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        ms = measure(lambda: step(mode), args.warmup, args.iters)
        results[mode] = ms
        tflops = step_flops / ms / 1e9
        # CPU: the process's peak resident memory so far (it only grows: run one way for a clean figure)
        mem = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else \
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        mfu = f"{100 * tflops / peak:.1f}%" if peak else "-"
        ratio = f"{results['reference'] / ms:>7.2f}x" if "reference" in results else "      -"
        print(f"{mode:<12}{ms:>10.1f}{10 / ms * 1000:>10.1f}{tflops:>10.2f}{mfu:>8}{mem:>10.2f}{ratio}")
    return results


def bench_unet(args, device, dtype):
    """Our UNet forward against diffusers' with the same weights, one run."""
    from diffusers import UNet2DConditionModel
    from diffusers.utils import logging
    logging.set_verbosity_error()  # its note about casting with .to() is not about us
    sd15 = args.size == "sd15"
    d = UNet2DConditionModel(cross_attention_dim=768, sample_size=64) if sd15 else UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2,
        attention_head_dim=2)
    d = d.to(device, dtype).eval()
    cfg = unet.config_from_diffusers(dict(d.config))
    ours = unet.UNet(cfg)
    ours.load_state_dict({unet.diffusers_name(k, cfg): v for k, v in d.state_dict().items()})
    ours = ours.to(device, dtype).eval()
    latent = (args.resolution or (256 if sd15 else 64)) // 8
    x = torch.randn(args.batch, 4, latent, latent, device=device, dtype=dtype)
    t = torch.randint(0, 1000, (args.batch,), device=device)  # diffusers' UNet: SD's 1000 steps
    c = torch.randn(args.batch, 77, cfg.context_dim, device=device, dtype=dtype)
    measure = timer(device)
    with torch.no_grad():
        ms_d = measure(lambda: d(x, t, c), args.warmup, args.iters)
        ms_o = measure(lambda: ours(x, t, c), args.warmup, args.iters)
    print(f"UNet forward, {args.size}, batch {args.batch}, latent {latent}x{latent}, {str(dtype).split('.')[1]}, "
          f"{device}, torch {torch.__version__}")
    print(f"diffusers {ms_d:.1f} ms   ours {ms_o:.1f} ms   ours is {ms_d / ms_o:.2f}x diffusers' speed")


def bench_sampling(args, device, dtype):
    """One 50-step guided DDIM sampling loop (batch 1, CFG doubles it to 2 rows per UNet call)."""
    from model.schedule import ddim_sample
    sd15 = args.size == "sd15"
    ucfg = unet.UNetConfig() if sd15 else unet.TINY
    model_unet = random_module(unet.UNet, ucfg, device, dtype)
    latent = (args.resolution or (512 if sd15 else 64)) // 8
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(1, 4, latent, latent, generator=gen).to(device, dtype)
    cond, uncond = (torch.randn(1, 77, ucfg.context_dim, generator=gen).to(device, dtype) for _ in range(2))
    abar = make_alphas_cumprod()
    ms = timer(device)(lambda: ddim_sample(model_unet, cond, uncond, z, abar, steps=50), 1, max(1, args.iters // 3))
    print(f"50-step sampling loop, {args.size}, latent {latent}x{latent}: {ms:.0f} ms")
    return ms


def bench_kernels(args, device, dtype):
    """Every kernel's table, then the stage-1 step and a sampling loop with kernels off and on."""
    import importlib
    if device != "cuda":
        print("bench.py --kernels: needs a CUDA device (the kernels are Triton; on CPU they only run under the "
              "interpreter, for correctness)")
        return
    for name in ("attention", "group_norm_silu", "geglu"):
        importlib.import_module(f"kernels.{name}").benchmark()
    times = {}
    for flag in (False, True):
        ops.use_kernels(flag)
        print(f"--- kernels {'on' if flag else 'off'}")
        times[flag] = bench_step(args, device, dtype)["ours"], bench_sampling(args, device, dtype)
    ops.use_kernels(None)
    print(f"kernels on vs off: stage-1 step {times[False][0] / times[True][0]:.2f}x, "
          f"sampling loop {times[False][1] / times[True][1]:.2f}x")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--unet", action="store_true", help="UNet forward: ours vs diffusers")
    p.add_argument("--kernels", action="store_true", help="kernel tables, then the step with kernels on vs off")
    p.add_argument("--size", choices=["tiny", "sd15"], default=None, help="default sd15 on CUDA, tiny on CPU")
    p.add_argument("--resolution", type=int, default=None, help="image size in pixels")
    p.add_argument("--batch", type=int, default=1, help="rows per UNet call (--unet)")
    p.add_argument("--precision", choices=list(run.PRECISIONS), default=None, help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--device", default=None, help="default cuda when available")
    p.add_argument("--ways", default="reference,one_graph,ours", help="which ways of the step to time")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations first")
    p.add_argument("--iters", type=int, default=10, help="timed iterations (median reported)")
    args = p.parse_args()
    device, _, dtype = run.device_and_dtype(args.device, args.precision)
    device = device.split(":")[0]
    args.size = args.size or ("sd15" if device == "cuda" else "tiny")
    torch.manual_seed(0)
    if args.unet:
        bench_unet(args, device, dtype)
    elif args.kernels:
        bench_kernels(args, device, dtype)
    else:
        bench_step(args, device, dtype)
