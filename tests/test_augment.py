"""Batch augmentations (pure, per-image, seeded) and the in-memory Loader (issue 2)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cnnlab.augment import Augment, Loader, alternating_flip, cutout, denormalize, flip, normalize, random_crop, translate
from cnnlab.data import load_dataset


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def batch(n=16, c=3, h=12, w=12, low=0, seed=0, dtype=torch.uint8):
    x = torch.randint(low, 256, (n, c, h, w), generator=gen(seed), dtype=torch.uint8)
    return x if dtype == torch.uint8 else x.to(dtype) / 255


def find_offset(out_img, padded_img, pad, h, w):
    """All (dy, dx) in [0, 2*pad]^2 where ``out_img`` equals the padded image's window."""
    return [(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
            if torch.equal(out_img, padded_img[:, dy:dy + h, dx:dx + w])]


# ----------------------------------------------------------------------------- shapes, dtypes, purity


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
@pytest.mark.parametrize("op", ["crop", "crop_reflect", "flip", "cutout", "augment"])
def test_shape_dtype_kept_and_input_untouched(dtype, op):
    x = batch(dtype=dtype)
    before = x.clone()
    fns = {
        "crop": lambda: random_crop(x, 3, gen()),
        "crop_reflect": lambda: random_crop(x, 3, gen(), mode="reflect"),
        "flip": lambda: flip(x, gen()),
        "cutout": lambda: cutout(x, 4, gen()),
        "augment": lambda: Augment(crop_pad=2, flip=True, cutout=3).float_part(
            Augment(crop_pad=2, flip=True, cutout=3).uint8_part(x, gen()), gen()),
    }
    out = fns[op]()
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(x, before)  # never changed in place
    assert out.data_ptr() != x.data_ptr()
    assert not torch.equal(out, x)  # something was augmented


def test_flip_p1_twice_is_identity_and_mirrors():
    x = batch()
    once = flip(x, gen(1), p=1.0)
    assert torch.equal(once, x.flip(3))
    assert torch.equal(flip(once, gen(2), p=1.0), x)
    assert torch.equal(flip(x, gen(3), p=0.0), x)


def test_flip_is_per_image():
    x = batch(n=64)
    out = flip(x, gen(5))
    flipped = [torch.equal(out[i], x[i].flip(2)) for i in range(64)]
    kept = [torch.equal(out[i], x[i]) for i in range(64)]
    assert all(f or k for f, k in zip(flipped, kept))
    assert 10 < sum(flipped) < 54  # about half, not all or none


@pytest.mark.parametrize("pad", [1, 2, 4])
def test_crop_is_a_window_of_the_zero_padded_image(pad):
    x = batch(n=24, h=10, w=11)
    out = random_crop(x, pad, gen(pad))
    padded = F.pad(x, (pad, pad, pad, pad))
    offsets = []
    for i in range(len(x)):
        found = find_offset(out[i], padded[i], pad, 10, 11)
        assert found, f"image {i} is not a window of its padded input"
        offsets.append(found[0])
    assert len(set(offsets)) > 3  # each image draws its own offset
    assert len({dy for dy, _ in offsets}) > 1 and len({dx for _, dx in offsets}) > 1


@pytest.mark.parametrize("mode", ["zeros", "reflect"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "one_image"])
def test_crop_takes_the_window_at_its_drawn_offset(mode, layout):
    x = batch(n=1 if layout == "one_image" else 12, c=1 if layout == "channels_last" else 3, h=9, w=10)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    pad = 2
    out = random_crop(x, pad, gen(7), mode)
    g = gen(7)  # the same draws, in the same order: dy for every image, then dx
    dy = torch.randint(0, 2 * pad + 1, (len(x),), generator=g)
    dx = torch.randint(0, 2 * pad + 1, (len(x),), generator=g)
    padded = F.pad(x.float(), (pad,) * 4, mode="constant" if mode == "zeros" else "reflect").to(x.dtype)
    for i in range(len(x)):
        assert torch.equal(out[i], padded[i, :, dy[i]:dy[i] + 9, dx[i]:dx[i] + 10])


def test_crop_reflect_has_no_zero_border():
    x = batch(n=32, low=1)  # no zero anywhere in the input
    out = random_crop(x, 4, gen(7), mode="reflect")
    assert int((out == 0).sum()) == 0
    zeros = random_crop(x, 4, gen(7), mode="zeros")
    assert int((zeros == 0).sum()) > 0  # zero padding does show up at these offsets
    padded = F.pad(x.float(), (4, 4, 4, 4), mode="reflect").to(torch.uint8)
    assert all(find_offset(out[i], padded[i], 4, 12, 12) for i in range(32))


def test_crop_rejects_unknown_mode_and_pad_zero_is_identity():
    x = batch()
    with pytest.raises(ValueError, match="reflect"):
        random_crop(x, 2, gen(), mode="wrap")
    assert torch.equal(random_crop(x, 0, gen()), x)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
@pytest.mark.parametrize("size", [1, 4, 8])
def test_cutout_erases_exactly_size_squared_per_channel(dtype, size):
    x = batch(n=20, c=3, h=10, w=10, low=1, dtype=dtype)
    out = cutout(x, size, gen(size), p=1.0)
    zeros = (out == 0).sum(dim=(2, 3))  # [N, C]
    assert (zeros == size * size).all(), zeros
    # the erased pixels form one square, the same in every channel
    mask = out == 0
    assert torch.equal(mask, mask[:, :1].expand_as(mask))
    for i in range(len(x)):
        ys, xs = mask[i, 0].nonzero(as_tuple=True)
        assert int(ys.max() - ys.min()) == size - 1 and int(xs.max() - xs.min()) == size - 1
    assert torch.equal(out[~mask], x[~mask])  # nothing else touched


def test_cutout_positions_differ_per_image_and_p():
    x = batch(n=32, low=1)
    out = cutout(x, 3, gen(11))
    corners = {tuple(int(v) for v in (out[i, 0] == 0).nonzero()[0]) for i in range(32)}
    assert len(corners) > 5
    assert torch.equal(cutout(x, 3, gen(), p=0.0), x)
    some = cutout(x, 3, gen(4), p=0.5)
    erased = [(some[i] == 0).any().item() for i in range(32)]
    assert 4 < sum(erased) < 28


def test_cutout_fill_value():
    x = torch.ones(4, 2, 6, 6)
    out = cutout(x, 2, gen(), fill=-1.5)
    assert ((out == -1.5).sum(dim=(2, 3)) == 4).all()


# ----------------------------------------------------------------------------- determinism


def test_same_seed_same_output_different_seed_different():
    x = batch(n=32)
    aug = Augment(crop_pad=4, crop_mode="reflect", flip=True, cutout=5)

    def run(seed):
        g = gen(seed)
        return aug.float_part(aug.uint8_part(x, g).float(), g)

    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_translate_moves_content_and_fills_by_reflection(dtype):
    x = torch.zeros(2, 1, 6, 6, dtype=dtype)
    x[:, 0, 2, 3] = 9
    before = x.clone()
    down_right = translate(x, 1, 2)
    assert down_right.dtype == dtype and down_right.shape == x.shape and torch.equal(x, before)
    assert down_right[0, 0, 3, 5] == 9 and int((down_right[:, :, 1:, 2:] != 0).sum()) == 2
    assert translate(x, -2, -3)[1, 0, 0, 0] == 9
    edge = torch.arange(6, dtype=dtype).repeat(1, 1, 6, 1)  # column index as value
    assert translate(edge, 0, 2)[0, 0, 0].tolist() == [2, 1, 0, 1, 2, 3]  # reflected about the left edge
    assert translate(x, 0, 0) is x


def test_augment_defaults_do_nothing():
    x = batch()
    aug = Augment()
    assert torch.equal(aug.uint8_part(x, gen()), x)
    assert torch.equal(aug.float_part(x.float(), gen()), x.float())


# ----------------------------------------------------------------------------- normalisation


def test_normalize_roundtrip():
    x = batch()
    mean, std = torch.tensor([0.5, 0.4, 0.3]), torch.tensor([0.2, 0.25, 0.3])
    y = normalize(x, mean, std)
    assert y.dtype == torch.float32
    assert torch.allclose(y, (x.float() / 255 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1), atol=1e-5)
    assert torch.allclose(denormalize(y, mean, std), x.float() / 255, atol=1e-5)
    assert normalize(x, mean, std, torch.bfloat16).dtype == torch.bfloat16
    xf = x.float()  # normalising works in place on a copy: a float input stays as it was
    kept = xf.clone()
    normalize(xf, mean, std)
    assert torch.equal(xf, kept)


# ----------------------------------------------------------------------------- Loader


def test_loader_shuffled_epoch_covers_every_index_once():
    n = 103
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 4, 4).contiguous()
    labels = torch.arange(n)
    loader = Loader(images, labels, 16, [0.0], [1.0], shuffle=True)
    assert len(loader) == 7
    ys, xs = [], []
    for x, y in loader.epoch(gen(0)):
        ys.append(y)
        xs.append(x)
    seen = torch.cat(ys)
    assert sorted(seen.tolist()) == list(range(n))
    assert seen.tolist() != list(range(n))  # actually shuffled
    # images stay paired with their labels
    assert torch.allclose(torch.cat(xs)[:, 0, 0, 0] * 255, seen.float(), atol=1e-3)
    other = torch.cat([y for _, y in loader.epoch(gen(1))])
    assert other.tolist() != seen.tolist()
    again = torch.cat([y for _, y in loader.epoch(gen(0))])
    assert again.tolist() == seen.tolist()


def test_loader_unshuffled_order_and_drop_last():
    images = torch.zeros(10, 1, 4, 4, dtype=torch.uint8)
    labels = torch.arange(10)
    keep = Loader(images, labels, 4, [0.0], [1.0])
    sizes = [len(y) for _, y in keep.epoch()]
    assert len(keep) == 3 and sizes == [4, 4, 2]
    assert torch.cat([y for _, y in keep.epoch()]).tolist() == list(range(10))
    drop = Loader(images, labels, 4, [0.0], [1.0], drop_last=True, shuffle=True)
    sizes = [len(y) for _, y in drop.epoch(gen())]
    assert len(drop) == 2 and sizes == [4, 4]


def test_loader_bf16_channels_last():
    images = batch(n=12, c=3, h=8, w=8)
    loader = Loader(images, torch.arange(12), 5, [0.5] * 3, [0.25] * 3, dtype=torch.bfloat16,
                    channels_last=True, augment=Augment(crop_pad=2, flip=True, cutout=2))
    outs = list(loader.epoch(gen()))
    assert [tuple(x.shape) for x, _ in outs] == [(5, 3, 8, 8), (5, 3, 8, 8), (2, 3, 8, 8)]
    for x, y in outs:
        assert x.dtype == torch.bfloat16 and y.dtype == torch.int64
        assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    plain = Loader(images, torch.arange(12), 12, [0.5] * 3, [0.25] * 3)
    x, _ = next(plain.epoch())
    assert x.dtype == torch.float32 and x.is_contiguous()


def test_loader_augments_only_with_a_generator_and_is_deterministic():
    images = batch(n=40, c=3, h=8, w=8)
    aug = Augment(crop_pad=2, flip=True, cutout=3)
    loader = Loader(images, torch.arange(40), 8, [0.5] * 3, [0.25] * 3, augment=aug)
    plain = torch.cat([x for x, _ in loader.epoch()])
    assert torch.allclose(plain, normalize(images, torch.tensor([0.5] * 3), torch.tensor([0.25] * 3)))
    a = torch.cat([x for x, _ in loader.epoch(gen(9))])
    b = torch.cat([x for x, _ in loader.epoch(gen(9))])
    c = torch.cat([x for x, _ in loader.epoch(gen(10))])
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, plain)
    # cutout after normalisation fills with 0 == the dataset mean
    assert ((a == 0).sum(dim=(2, 3)) >= 9).all()
    assert torch.equal(images, batch(n=40, c=3, h=8, w=8))  # the source tensor is untouched


def test_loader_normalises_real_mnist(data_root):
    ds = load_dataset("mnist", root=data_root, acquire=False, log=print)
    loader = Loader(ds.train.images, ds.train.labels, 4096, ds.mean, ds.std)
    total = sq = 0.0
    count = 0
    for x, _ in loader.epoch():
        total += x.double().sum().item()
        sq += (x.double() ** 2).sum().item()
        count += x.numel()
    mean = total / count
    std = (sq / count - mean ** 2) ** 0.5
    assert abs(mean) < 0.01 and abs(std - 1) < 0.01
    assert count == 60000 * 28 * 28


def test_alternating_flip_follows_start_bits_and_epoch_parity():
    x = batch(n=6, c=2, h=5, w=5)
    start = torch.tensor([0, 1, 0, 1, 1, 0], dtype=torch.uint8)
    before = x.clone()
    odd, even = alternating_flip(x, start, 1), alternating_flip(x, start, 2)
    assert torch.equal(x, before)  # input untouched
    for i in range(6):
        assert torch.equal(odd[i], x[i] if start[i] else x[i].flip(2))
        assert torch.equal(even[i], x[i].flip(2) if start[i] else x[i])


def test_loader_alternate_flip_shows_each_image_both_ways_over_two_epochs():
    n = 64
    images = batch(n=n, c=1, h=6, w=6)
    loader = Loader(images, torch.arange(n), 16, [0.0], [1.0], shuffle=True, seed=3,
                    augment=Augment(flip=True, alternate_flip=True))
    g = gen(0)

    def mirrored(epoch):  # label -> was the image mirrored this epoch
        out = {}
        for xb, yb in loader.epoch(g, epoch):
            for xi, yi in zip(xb, yb):
                src = normalize(images[yi:yi + 1], loader.mean, loader.std)[0]
                assert torch.equal(xi, src) or torch.equal(xi, src.flip(2))
                out[int(yi)] = not torch.equal(xi, src)
        return out

    e1, e2, e3 = mirrored(1), mirrored(2), mirrored(3)
    assert sorted(e1) == list(range(n))
    assert all(e1[i] != e2[i] for i in range(n)) and e1 == e3  # both ways in any two epochs
    assert 16 < sum(e1.values()) < 48  # random start: about half mirrored first
    same = Loader(images, torch.arange(n), 16, [0.0], [1.0], seed=3, augment=Augment(flip=True, alternate_flip=True))
    other = Loader(images, torch.arange(n), 16, [0.0], [1.0], seed=4, augment=Augment(flip=True, alternate_flip=True))
    assert torch.equal(same.flip_start, loader.flip_start) and not torch.equal(other.flip_start, loader.flip_start)


@pytest.mark.parametrize("flips", [dict(flip=True), dict(flip=True, alternate_flip=True)])
@pytest.mark.parametrize("world", [2, 4])
def test_loader_shards_put_together_are_the_one_process_batches(world, flips):
    """Data-parallel ranks each take their consecutive part of every batch of the same permutation,
    cropped, flipped and cut out exactly as the one-process loader does to those images."""
    n, bs = 96, 16
    images = batch(n=n, c=3, h=8, w=8)
    common = dict(augment=Augment(crop_pad=2, cutout=3, cutout_p=0.5, **flips), shuffle=True, drop_last=True, seed=5)
    one = Loader(images, torch.arange(n), bs, [0.5] * 3, [0.25] * 3, **common)
    parts = [Loader(images, torch.arange(n), bs, [0.5] * 3, [0.25] * 3, rank=r, world_size=world, **common)
             for r in range(world)]
    for epoch in (1, 2):
        whole = list(one.epoch(gen(7), epoch))
        shards = [list(p.epoch(gen(7), epoch)) for p in parts]
        assert all(len(p) == len(one) == n // bs and p.images_per_epoch == n for p in parts)
        for i, (x, y) in enumerate(whole):
            assert all(len(s[i][1]) == bs // world for s in shards)
            assert torch.equal(torch.cat([s[i][1] for s in shards]), y)
            assert torch.equal(torch.cat([s[i][0] for s in shards]), x)
    with pytest.raises(ValueError, match="multiple of 3"):
        Loader(images, torch.arange(n), bs, [0.5] * 3, [0.25] * 3, rank=0, world_size=3, **common)
