"""Train the toy world's attribute classifier: the ruler that measures concept leakage exactly.

    python toy/train_classifier.py              # a few minutes on 2 CPU cores -> toy/tiny/classifier.safetensors

It reads a 64x64 image and names its shape, colour, pattern, size, position, background colour and
background style (toy/world.py). It is used only to measure generated images, never to train
or steer a generator, so it trains on the whole world, held-out concepts included. Generated
images are softer and noisier than rendered ones, so training images are randomly blurred and
noised; the report gives per-attribute accuracy on fresh images (clean and degraded) and on the
held-out concepts alone.
"""
import argparse
import json
import math
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

# Run as `python toy/<script>.py`, Python puts toy/ first on sys.path, not the repository root
# where the `model` library and the `toy` package are: add the root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import model
from model import run
from model.errors import UserError
from model.loader import save_safetensors
from toy import world

# Seeds of the three independent image streams: (seed, stream, ...) never collide.
TRAIN, TEST, CONCEPTS = 0, 1, 2


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=run.HelpFormatter)
    p.add_argument("--out", default=os.path.join(model.TINY_DIR, "classifier.safetensors"),
                   help="where to write the classifier (default: toy/tiny/classifier.safetensors, where "
                   "toybench.py reads it)")
    p.add_argument("--steps", type=int, default=3000, help="training steps (fresh images every step)")
    p.add_argument("--batch", type=int, default=64, help="images per step")
    p.add_argument("--lr", type=float, default=2e-3, help="AdamW peak learning rate (cosine decay)")
    p.add_argument("--width", type=int, default=16, help="channels of the first conv (a multiple of 8)")
    p.add_argument("--eval", type=int, default=2000, help="fresh test images for the accuracy report")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and of every image")
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch < 1 or args.eval < 1 or args.width < 8 or args.width % 8:
        raise UserError("--steps, --batch and --eval must be >= 1 and --width a positive multiple of 8")
    return args


def degrade(x, generator, max_sigma=1.2, max_noise=0.06):
    """Per image: a Gaussian blur of random width and Gaussian noise of random strength."""
    b = x.shape[0]
    sigma = torch.rand(b, generator=generator) * max_sigma + 1e-3
    offsets = torch.arange(-3, 4, dtype=torch.float32)
    kernel = torch.exp(-offsets[None] ** 2 / (2 * sigma[:, None] ** 2))
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(3, 0)  # one row per (image, channel)
    # [B, 3, H, W] -> [1, B*3, H, W]: a grouped conv gives every image its own kernel
    y = x.reshape(1, b * 3, *x.shape[2:])
    y = F.conv2d(F.pad(y, (3, 3, 0, 0), mode="replicate"), kernel[:, None, None, :], groups=b * 3)
    y = F.conv2d(F.pad(y, (0, 0, 3, 3), mode="replicate"), kernel[:, None, :, None], groups=b * 3)
    noise = torch.rand(b, 1, 1, 1, generator=generator) * max_noise
    return y.reshape(x.shape) + noise * torch.randn(x.shape, generator=generator)


@torch.no_grad()
def accuracy(classifier, images, attrs, batch=256):
    """{attribute: fraction of images whose value it names correctly}."""
    targets = world.labels(attrs)
    correct = {name: 0 for name in targets}
    for start in range(0, len(images), batch):
        logits = classifier(images[start:start + batch])
        for name in correct:
            correct[name] += (logits[name].argmax(1) == targets[name][start:start + batch]).sum().item()
    return {name: round(c / len(images), 4) for name, c in correct.items()}


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    classifier = world.AttributeClassifier(args.width)
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=args.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * s / args.steps)))
    generator = torch.Generator().manual_seed(args.seed)

    # ---------------------------------------------------------------------------------------------
    # train: every step draws new images from the whole world, so nothing is seen twice
    bar = tqdm(range(args.steps), desc="classifier", dynamic_ncols=True)
    for step in bar:
        images, _, attrs = world.batch(np.random.default_rng([args.seed, TRAIN, step]), args.batch, held_out=())
        logits = classifier(degrade(world.to_tensor(images), generator))
        targets = world.labels(attrs)
        loss = sum(F.cross_entropy(logits[name], targets[name]) for name in logits)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")

    # ---------------------------------------------------------------------------------------------
    # measure on images never trained on
    classifier.eval()
    images, _, attrs = world.batch(np.random.default_rng([args.seed, TEST]), args.eval, held_out=())
    test = world.to_tensor(images)
    concept_rng = np.random.default_rng([args.seed, CONCEPTS])
    per_concept = max(1, args.eval // len(world.HELD_OUT))
    concept_sets = [world.batch(concept_rng, per_concept, concept=c) for c in world.HELD_OUT]
    report = {
        "test": accuracy(classifier, test, attrs),
        "test_degraded": accuracy(classifier, degrade(test, torch.Generator().manual_seed(args.seed)), attrs),
        "held_out_concepts": accuracy(classifier, world.to_tensor(np.concatenate([s[0] for s in concept_sets])),
                                      sum((s[2] for s in concept_sets), [])),
    }
    print(f"{'attribute':<18}" + "".join(f"{name:>20}" for name in report))
    for attribute in world.ATTRIBUTES:
        print(f"{attribute:<18}" + "".join(f"{scores[attribute]:>20.4f}" for scores in report.values()))
    worst = min(report["test"].values())
    if worst < 0.95:
        run.warn(f"the weakest attribute is {worst:.1%} accurate on clean test images (aim: 95%); train longer")

    # ---------------------------------------------------------------------------------------------
    # save
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    metadata = {"width": str(args.width), "steps": str(args.steps), "seed": str(args.seed),
                "attributes": json.dumps({k: list(v) for k, v in world.ATTRIBUTES.items()}),
                "accuracy": json.dumps(report)}
    save_safetensors(classifier.state_dict(), args.out, metadata)
    print(f"classifier saved to {args.out}")


if __name__ == "__main__":
    run.report_user_errors()
    main()
