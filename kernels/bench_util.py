"""What the benchmarks share: timing (triton's do_bench: warm-up, cache flush between runs, CUDA
events, the median) and a table that prints as text and writes as markdown, headed by the device
and the torch and triton versions it was measured with."""
import torch


def time_ms(fn):
    from triton.testing import do_bench  # only here: bench.py's tables need no triton on CPU
    return do_bench(fn, return_mode="median")


def environment(device=None):
    """'NVIDIA H200, torch 2.11.0, triton 3.6.0': what a measurement was made on."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
    name = torch.cuda.get_device_name() if cuda else "CPU"
    return f"{name}, torch {torch.__version__}, triton {triton_version}"


def cell(value, digits=0):
    """A number as the tables show it; None (not measured) as '-'."""
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


class Table:
    """Rows of cells under named columns, with a title and notes."""

    def __init__(self, title, columns, notes=(), device=None, path=None):
        """path: a markdown file rewritten after every row, so a run cut short keeps what it measured."""
        self.title, self.columns, self.notes, self.rows = title, list(columns), list(notes), []
        self.env, self.path = environment(device), path
        self._save()

    def add(self, *cells):
        if len(cells) != len(self.columns):
            raise ValueError(f"{len(cells)} cells for {len(self.columns)} columns")
        self.rows.append([str(c) for c in cells])
        self._save()

    def _save(self):
        if self.path:
            with open(self.path, "w") as f:
                f.write(self.markdown())

    def text(self):
        widths = [max(len(r[i]) for r in [self.columns, *self.rows]) for i in range(len(self.columns))]
        lines = [f"{self.title} ({self.env})", *self.notes]
        for row in [self.columns, *self.rows]:
            lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        return "\n".join(lines)

    def markdown(self):
        out = [f"### {self.title}", "", f"Measured on {self.env}.", ""]
        out += [*(n for note in self.notes for n in (note, "")),
                "| " + " | ".join(self.columns) + " |", "|" + "---|" * len(self.columns)]
        out += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in self.rows]
        return "\n".join(out) + "\n"


def memory_bound_table(title, shape_label, shapes, make, ours, reference, path=None, compiled=True):
    """GB/s forward and forward+backward of a memory-bound op at each shape: ours beside eager torch
    and torch.compile of the same torch code (inductor fuses it its own way). make(shape) -> (args,
    the inputs to differentiate, grad_out, bytes moved forward, bytes moved forward+backward)."""
    ways = {"ours": ours, "eager": reference}
    if compiled:
        ways["compiled"] = None  # compiled per shape below: inductor specialises on it
    table = Table(title, [shape_label, *(f"fwd {w}" for w in ways), "fwd ours/eager", "fwd ours/compiled",
                          *(f"f+b {w}" for w in ways), "f+b ours/eager", "f+b ours/compiled"],
                  notes=["GB/s of the minimum traffic (fwd: read the input, write the output; fwd+bwd adds "
                         "reading them again with the output's gradient and writing the input's)"], path=path)
    for shape in shapes:
        args, wrt, grad_out, fwd_bytes, both_bytes = make(shape)
        fns = dict(ways)
        if compiled:
            fns["compiled"] = torch.compile(reference, dynamic=False)
        cells = []
        for nbytes, backward, run in ((fwd_bytes, False, lambda fn: fn(*args)),
                                      (both_bytes, True, lambda fn: torch.autograd.grad(fn(*args), wrt, grad_out))):
            rates = {}
            for name, fn in fns.items():
                try:
                    with torch.set_grad_enabled(backward):
                        rates[name] = nbytes / time_ms(lambda: run(fn)) / 1e6
                except Exception:  # noqa: BLE001  (inductor failing leaves '-' and the rest measured)
                    rates[name] = None
            ratio = lambda other: f"{rates['ours'] / rates[other]:.2f}x" if rates.get(other) else "-"  # noqa: E731
            cells += [cell(r) for r in rates.values()] + [ratio("eager"), ratio("compiled")]
        table.add(str(list(shape)), *cells)
    return [table]
