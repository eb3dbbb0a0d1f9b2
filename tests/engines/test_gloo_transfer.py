"""The gloo weight-transfer backend's wire plan: both sides cut the same buckets from the update
info, and the sender refuses a source whose tensors disagree with what it declared."""

import pytest
import torch

from distil_ray.engines.gloo_transfer import GlooTrainerWeightTransferEngine, GlooUpdateInfo, bucket_plan


def test_buckets_are_consecutive_and_within_the_limit():
    assert bucket_plan([4, 4, 4, 4], 8) == [[0, 1], [2, 3]]
    assert bucket_plan([3, 10, 2, 2, 5], 8) == [[0], [1], [2, 3], [4]]  # a tensor over the limit travels alone
    assert bucket_plan([], 8) == []
    sizes = [7, 1, 8, 3, 3, 3, 9, 1]
    plan = bucket_plan(sizes, 8)
    assert [i for b in plan for i in b] == list(range(len(sizes)))
    assert all(sum(sizes[i] for i in b) <= 8 or len(b) == 1 for b in plan)


def test_update_info_lays_out_aligned_views_of_each_dtype():
    info = GlooUpdateInfo(names=["a", "b", "c"], dtype_names=["bfloat16", "float32", "bfloat16"],
                          shapes=[[3], [2, 2], [5]], bucket_bytes=32)
    assert info.buckets() == [[0, 1], [2]]  # 6 -> 16 bytes and 16, then 10 -> 16
    buffer = torch.zeros(32, dtype=torch.uint8)
    (a, va), (b, vb) = info.views(buffer, [0, 1])
    assert (a, va.dtype, tuple(va.shape)) == ("a", torch.bfloat16, (3,))
    assert (b, vb.dtype, tuple(vb.shape)) == ("b", torch.float32, (2, 2))
    vb.copy_(torch.arange(4.0).view(2, 2))  # a float32 view at byte 16: aligned, and disjoint from a
    assert torch.equal(buffer[16:32].view(torch.float32), torch.arange(4.0)) and not va.any()
    with pytest.raises(ValueError, match="differ in length"):
        GlooUpdateInfo(names=["a"], dtype_names=[], shapes=[[1]])


class _Source:
    def __init__(self, pairs):
        self.pairs = pairs

    def __iter__(self):
        return iter(self.pairs)


def test_sender_refuses_a_tensor_its_metadata_did_not_declare():
    engine = GlooTrainerWeightTransferEngine(client=None, source=_Source([("a", torch.zeros(2, dtype=torch.float32))]),
                                             is_sender=True, bucket_bytes=1 << 20)
    info = GlooUpdateInfo(names=["a"], dtype_names=["bfloat16"], shapes=[[2]])
    with pytest.raises(ValueError, match="metadata declared"):
        engine._send(info)
