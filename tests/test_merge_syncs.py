"""The reduction steps read no tensor value on the host where a GPU would run them: no .item(), .tolist(),
bool()/int()/float() of a tensor, nonzero() or boolean-mask indexing, any of which makes the host wait
for the device (and rules out CUDA-graph capture). On the CPU the steps' input checks read values
(merge.plan.checks_values); here they are switched off as on a GPU, and every call that would sync
is recorded. benchmarks/gpu_check.py makes the same check on a GPU with torch.cuda.set_sync_debug_mode."""
import traceback

import pytest
import torch

import mambamerge
from mambamerge.merge import matching, plan, stm
from conftest import perturb_

CASES = [
    ("mame", {}), ("mame", {"sources": "pairs"}), ("mame", {"sources": "spread", "cap": 1}),
    ("mame", {"match": "window", "placement": "important"}), ("mame", {"sources": "random"}),
    ("mame", {"match": "bipartite"}), ("stm", {"w_protect": 0}), ("tome", {}), ("tome_unordered", {}),
    ("rmeeto", {}), ("mtr", {}), ("top", {}), ("evit", {}), ("random", {}),
]
SYNCING = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "unique", "masked_select",
           "cpu", "numpy")


class SyncSpy:
    """Records every syncing Tensor call made from mambamerge's merge code while active."""

    def __init__(self, monkeypatch):
        self.calls = []
        for name in SYNCING:
            monkeypatch.setattr(torch.Tensor, name, self._spy(name, getattr(torch.Tensor, name)))
        monkeypatch.setattr(torch.Tensor, "__getitem__", self._spy_indexing(torch.Tensor.__getitem__))

    def _caller(self):
        frame = traceback.extract_stack(limit=4)[-3]
        return f"{frame.filename.rsplit('src/', 1)[-1]}:{frame.lineno}" if "mambamerge" in frame.filename else None

    def _spy(self, name, method):
        def spy(tensor, *args, **kwargs):
            where = self._caller()
            if where is not None:
                self.calls.append(f"{where} {name}")
            return method(tensor, *args, **kwargs)
        return spy

    def _spy_indexing(self, method):
        def spy(tensor, index):
            parts = index if isinstance(index, tuple) else (index,)
            where = self._caller()
            if where is not None and any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts):
                self.calls.append(f"{where} boolean-mask indexing")
            return method(tensor, index)
        return spy


def as_on_a_gpu(monkeypatch):
    for module in (plan, matching, stm):
        monkeypatch.setattr(module, "checks_values", lambda t: False)


@pytest.mark.parametrize("method,options", CASES, ids=[f"{m}{o or ''}" for m, o in CASES])
def test_reduction_steps_read_no_tensor_value(monkeypatch, method, options):
    def make_model():  # a fresh copy each time: a random method's draws advance at every forward
        torch.manual_seed(0)
        model = perturb_(mambamerge.create_model("vim_pico", depth=4)).eval()
        return mambamerge.patch(model, method, schedule=[0, 3, 2, 2], **options)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        checked = make_model()(images)
        model = make_model()
        as_on_a_gpu(monkeypatch)
        spy = SyncSpy(monkeypatch)
        unchecked = model(images)
    assert spy.calls == []
    torch.testing.assert_close(unchecked, checked, rtol=0, atol=0)  # skipping the checks changes nothing
