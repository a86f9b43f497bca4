"""Throughput of the training step, the UNet and the kernels, measured as ratios in one run.

    python bench.py                      # stage-1 step, three ways (CPU: tiny model; CUDA: SD1.5, 512 px, bf16)
    python bench.py --unet               # our UNet forward vs diffusers' at the same config
    python bench.py --compare            # step and 50-step sampling: eager, torch.compile, our kernels, both
    python bench.py --kernels            # every kernel's table (CUDA), then --compare

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
from model.errors import UserError
from kernels.bench_util import Table
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


class StepBench:
    """The stage-1 step on random models (SD1.5 or the tiny one), callable with any way of calling
    the UNet and any UNet (eager or compiled)."""

    def __init__(self, args, device, dtype):
        sd15 = args.size == "sd15"
        ucfg, vcfg, ccfg = (unet.UNetConfig(), vae.VAEConfig(), clip.CLIPConfig()) if sd15 else \
            (unet.TINY, vae.TINY, clip.TINY)
        self.resolution = resolution = args.resolution or (512 if sd15 else 64)
        self.unet = random_module(unet.UNet, ucfg, device, dtype)
        self.vae = random_module(vae.VAE, vcfg, device, dtype)
        self.encoder = random_module(clip.CLIPTextEncoder, ccfg, device, dtype)
        self.alphas_cumprod = make_alphas_cumprod().to(device)
        self.images = torch.rand(4, 3, resolution, resolution, device=device, dtype=dtype) * 2 - 1
        factor = 2 ** (len(vcfg.ch_mult) - 1)
        self.latent_shape = (4, resolution // factor, resolution // factor)
        self.vectors = torch.randn(1 + 8 * 4, ucfg.context_dim, device=device, requires_grad=True)
        self.ids = torch.randint(0, 49407, (3, 77), device=device)
        self.ids[:, 1:3] = torch.tensor([49408, 49409], device=device)  # new-token rows read the trainable vectors
        self.empty_ids = torch.full((1, 77), 49407, device=device)
        self.empty_ids[0, 0] = 49406
        with torch.no_grad():
            self.cached_latents = self.vae.encode(self.images)[0] * 0.18215
            self.cached_empty = self.encoder(self.empty_ids)
        self.gen = torch.Generator().manual_seed(0)
        self.device, self.dtype = device, dtype
        if sd15:  # the count at 512 px, scaled by pixels elsewhere (attention makes that approximate)
            fwd, bwd = 0.803e12 * (resolution / 512) ** 2, 0.99e12 * (resolution / 512) ** 2
        else:  # torch's counter (it misses the attention core on CPU, so this errs low)
            fwd = unet_flops(self.unet, resolution // factor, ucfg.context_dim, device, dtype)
            bwd = unet_flops(self.unet, resolution // factor, ucfg.context_dim, device, dtype, backward=True) - fwd
        self.flops = 10 * fwd + 5 * bwd  # ten forward rows, five with an input-only backward
        self.title = (f"stage-1 step, ten rows, {args.size} UNet, {resolution} px, {str(dtype).split('.')[1]}, "
                      f"{self.flops / 1e12:.3f} TFLOP per step")

    def __call__(self, mode, model_unet=None):
        model_unet = self.unet if model_unet is None else model_unet
        t = torch.randint(0, len(self.alphas_cumprod), (4,), generator=self.gen).to(self.device)
        noise = torch.randn(4, *self.latent_shape, generator=self.gen).to(self.device, self.dtype)
        if mode == "reference":
            with torch.no_grad():  # the authors' code: every image and "" encoded again each step
                latents = self.vae.encode(self.images)[0] * 0.18215
                empty = self.encoder(self.empty_ids)
        else:
            latents, empty = self.cached_latents, self.cached_empty
        hidden = self.encoder(self.ids, extra_embeddings=self.vectors.to(self.dtype))
        table = torch.cat([hidden, empty])
        x = add_noise(latents, t, noise, self.alphas_cumprod)
        rows = conditions.stage1_rows(x[:1], t[:1], x[1:], t[1:], with_dd=True)
        terms = accord_losses.loss_terms(WAYS[mode](model_unet, table, rows), noise[:1], t[:1], self.alphas_cumprod)
        accord_losses.total(terms, {"excl": 0.05, "dd": 0.1}).backward()
        self.vectors.grad = None


def peak_memory_gib(device):
    """CUDA: the peak since the last reset; CPU: the process's peak resident memory so far (it only
    grows: run one way alone for a clean figure)."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def reset_memory(device):
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def bench_step(args, device, dtype):
    step = StepBench(args, device, dtype)
    measure, peak = timer(device), peak_tflops(device)
    table = Table(step.title, ["way", "ms/step", "rows/s", "TFLOP/s", "MFU", "peak GiB", "vs ref"], device=device,
                  path=args.markdown)
    results = {}
    for mode in args.ways.split(","):
        reset_memory(device)
        ms = results[mode] = measure(lambda: step(mode), args.warmup, args.iters)
        tflops = step.flops / ms / 1e9
        table.add(mode, f"{ms:.1f}", f"{10 / ms * 1000:.1f}", f"{tflops:.2f}",
                  f"{100 * tflops / peak:.1f}%" if peak else "-", f"{peak_memory_gib(device):.2f}",
                  f"{results['reference'] / ms:.2f}x" if "reference" in results else "-")
    print(table.text())
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


# How the UNet runs: (our kernels on, wrapped in torch.compile). Eager runs torch's ops with SDPA;
# inductor makes its own fused GroupNorm+SiLU and GEGLU; with kernels on, ours run between its graphs.
BACKENDS = {"eager": (False, False), "compile": (False, True), "kernels": (True, False),
            "kernels+compile": (True, True)}


def sampling_loop(step, model_unet):
    """One 50-step guided DDIM loop (batch 1; guidance doubles it to 2 rows per UNet call)."""
    from model.schedule import ddim_sample
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(1, *step.latent_shape, generator=gen).to(step.device, step.dtype)
    cond, uncond = (torch.randn(1, 77, step.unet.config.context_dim, generator=gen).to(step.device, step.dtype)
                    for _ in range(2))
    return lambda: ddim_sample(model_unet, cond, uncond, z, step.alphas_cumprod.cpu(), steps=50)


def first_call_s(fn, device):
    """Seconds of the first call: compiling (Triton or inductor) and autotuning included."""
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def bench_compare(args, device, dtype):
    """The stage-1 step (our way of calling the UNet) and a 50-step sampling loop, with the UNet run
    each way in BACKENDS: one table, ratios against eager. Returns the table."""
    backends = args.backends.split(",")
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise UserError(f"--backends: unknown {', '.join(unknown)}; choose from {', '.join(BACKENDS)}")
    if device != "cuda" and any(BACKENDS[b][0] for b in backends):
        print("bench.py: kernel ways skipped: the Triton kernels need CUDA (on CPU they only run under the "
              "interpreter, for correctness)")
        backends = [b for b in backends if not BACKENDS[b][0]]
    kernel_ops = set(args.kernel_ops.split(",")) if args.kernel_ops else True
    step, measure = StepBench(args, device, dtype), timer(device)
    table = Table(f"{step.title}; 50-step sampling, batch 1 with guidance",
                  ["UNet run by", "step: first s", "ms/step", "vs eager", "sampling: first s", "ms/loop", "vs eager",
                   "peak GiB"],
                  notes=["first s: the first call, compiling and autotuning included; ms: median after warm-up"
                         + (f"; kernels for {args.kernel_ops} only" if args.kernel_ops else "")], device=device,
                  path=args.markdown)
    base, failed = {}, []
    for backend in backends:
        kernels_on, compiled = BACKENDS[backend]
        ops.use_kernels(kernel_ops if kernels_on else False)
        torch._dynamo.reset()  # each compiled way compiles afresh, its first-call time honest
        reset_memory(device)
        try:
            model_unet = torch.compile(step.unet, dynamic=False) if compiled else step.unet
            row = []
            for fn, iters in ((lambda: step("ours", model_unet), args.iters),
                              (sampling_loop(step, model_unet), max(1, args.iters // 3))):
                first = first_call_s(fn, device)
                ms = measure(fn, max(0, args.warmup - 1), iters)
                base.setdefault(len(row), ms)
                row += [f"{first:.1f}", f"{ms:.1f}", f"{base[len(row)] / ms:.2f}x"]
            table.add(backend, *row, f"{peak_memory_gib(device):.2f}")
        except Exception as e:  # noqa: BLE001  (one way failing leaves the others measured)
            failed.append(f"{backend}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300])
            table.add(backend, *["failed"] * 6, "-")
        finally:
            ops.use_kernels(None)
    print(table.text())
    if failed:
        raise UserError("bench.py: " + "; ".join(failed))
    return table


def bench_kernels(args, device, dtype):
    """Every kernel's table, then the step and sampling comparison."""
    import importlib
    if device != "cuda":
        print("bench.py --kernels: the kernel tables need a CUDA device (the kernels are Triton; on CPU they only "
              "run under the interpreter, for correctness)")
    else:
        for name in ("attention", "group_norm_silu", "geglu"):
            for table in importlib.import_module(f"kernels.{name}").benchmark():
                print(table.text())
    bench_compare(args, device, dtype)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--unet", action="store_true", help="UNet forward: ours vs diffusers")
    p.add_argument("--compare", action="store_true",
                   help="step and sampling with the UNet run eager, compiled, with our kernels, both")
    p.add_argument("--kernels", action="store_true", help="kernel tables (CUDA), then --compare")
    p.add_argument("--backends", default=",".join(BACKENDS), help="--compare: which ways to run the UNet")
    p.add_argument("--kernel_ops", default="", help="kernel ways: only these ops' kernels (e.g. attention,geglu)")
    p.add_argument("--size", choices=["tiny", "sd15"], default=None, help="default sd15 on CUDA, tiny on CPU")
    p.add_argument("--resolution", type=int, default=None, help="image size in pixels")
    p.add_argument("--batch", type=int, default=1, help="rows per UNet call (--unet)")
    p.add_argument("--precision", choices=list(run.PRECISIONS), default=None, help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--device", default=None, help="default cuda when available")
    p.add_argument("--ways", default="reference,one_graph,ours", help="which ways of the step to time")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations first")
    p.add_argument("--iters", type=int, default=10, help="timed iterations (median reported)")
    p.add_argument("--markdown", default=None, help="also write the step table to this markdown file")
    args = p.parse_args(argv)
    if args.kernel_ops:
        unknown = set(args.kernel_ops.split(",")) - set(ops.OPS)
        if unknown:
            p.error(f"--kernel_ops: no kernel named {', '.join(sorted(unknown))} (the ops: {', '.join(ops.OPS)})")
    return args


def main(argv=None):
    args = parse_args(argv)
    device, _, dtype = run.device_and_dtype(args.device, args.precision)
    device = device.split(":")[0]
    args.size = args.size or ("sd15" if device == "cuda" else "tiny")
    torch.manual_seed(0)
    if args.unet:
        bench_unet(args, device, dtype)
    elif args.kernels:
        bench_kernels(args, device, dtype)
    elif args.compare:
        bench_compare(args, device, dtype)
    else:
        bench_step(args, device, dtype)


if __name__ == "__main__":
    run.report_user_errors()
    main()
