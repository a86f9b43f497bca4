"""The toy world: a generated world of coloured shapes (world.py), the embedded toy Stable Diffusion
trained on it (pretrain_tiny.py -> tiny/tiny_sd.safetensors), its attribute classifier
(train_classifier.py -> tiny/classifier.safetensors) and ToyBench, which measures concept leakage
with them (toybench.py). None of it is needed to personalise real Stable Diffusion; it lets the
method run on a CPU with nothing downloaded and be measured exactly. Run the scripts from the
repository root: python toy/toybench.py, python toy/pretrain_tiny.py, python toy/train_classifier.py.
"""
