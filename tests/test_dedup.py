"""dedup.py: candidates from banded hashes, the aligned-thumbnail check, the chain guard; each kind of
copy on two image families of different character (plain-sheet leaves and greyscale scans)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from tune_rice.data import dedup, demo

SIZE = 256


def _signature(im: Image.Image) -> dedup.Signature:
    return dedup.signature(im)


def _decode(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.draft("RGB", (128, 128))
    return im.convert("RGB")


@pytest.fixture(scope="module", params=["plain", "scans"])
def family(request, tmp_path_factory):
    """(family, originals as PIL images): 6 per class of one family, the demo's own copies left out."""
    root = demo.generate_demo(
        tmp_path_factory.mktemp(request.param) / "set", per_class=7, size=SIZE, seed=11, family=request.param
    )
    marker = __import__("json").loads((root / demo.MARKER).read_text())
    copies = {d["path"] for d in marker["near_duplicates"]}
    files = [p for p in sorted(root.glob("*/*.jpg")) if p.relative_to(root).as_posix() not in copies]
    return request.param, [Image.open(p).convert("RGB") for p in files]


# Known misses, measured on these very copies; the test fails as soon as one is fixed (or another appears).
KNOWN_MISSES = {
    # detail similarity 0.62 at 72 px (0.60 at 128 px), outline 0.99, 27 keypoint inliers: aligned,
    # yet the moved leaf's fine detail does not correlate enough
    "plain": [("shift", 12)],
    # passes the check (0.94, 79 inliers) but is no candidate: 22 bits from its source's perceptual
    # hash, 18 from its histogram code, and its whole view is 16 bits from every view of its source once
    # the set's mean view is taken away (0.97 cosine before)
    "scans": [("crop", 10)],
}


def test_each_kind_of_copy_is_grouped_and_nothing_else(family):
    # 3 copies of each kind, each kind from 3 originals of its own, all grouped in one go
    name, originals = family
    rng = np.random.default_rng(5)
    sources = {kind: [3 * k, 3 * k + 1, 3 * k + 2] for k, kind in enumerate(demo.COPY_KINDS)}
    made = [
        (kind, src, demo.copy_image(originals[src], kind, rng)[0]) for kind in demo.COPY_KINDS for src in sources[kind]
    ]
    sigs = [_signature(im) for im in originals + [_decode(data) for _, _, data in made]]
    grouping = dedup.group_images([f"x{k}" for k in range(len(sigs))], sigs)
    g = grouping.group
    n = len(originals)
    missed = [(kind, src) for c, (kind, src, _) in enumerate(made) if g[n + c] != g[src]]
    assert missed == KNOWN_MISSES.get(name, []), (name, missed)
    # distinct originals stay apart: one group per original
    assert len(set(g[:n].tolist())) == n, name
    near = [p for p in grouping.pairs if p.check == "near"]
    assert all(p.similarity >= dedup.DEFAULT_MIN_SIMILARITY and p.outline >= dedup.DEFAULT_MIN_OUTLINE for p in near)


def test_distinct_look_alikes_are_not_merged(tmp_path):
    # 60 distinct plain-sheet leaves (centred, upright, same framing): only the demo's own planted copies
    # may be grouped.
    root = demo.generate_demo(tmp_path / "plain", per_class=14, size=SIZE, seed=2, family="plain")
    marker = __import__("json").loads((root / demo.MARKER).read_text())
    files = sorted(root.glob("*/*.jpg"))
    rel = [p.relative_to(root).as_posix() for p in files]
    identity = {r: r for r in rel}
    identity.update({d["path"]: d["source"] for d in marker["near_duplicates"]})
    sigs = [_signature(Image.open(p)) for p in files]
    g = dedup.group_images([f"x{k}" for k in range(len(rel))], sigs).group
    for grp in np.unique(g):
        members = {identity[rel[k]] for k in np.flatnonzero(g == grp)}
        assert len(members) == 1, members


def test_flipped_and_turned_copies_only_with_flips(family):
    _, originals = family
    im = originals[3]
    turned = [im.transpose(Image.Transpose.ROTATE_90), im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    sigs = [_signature(x) for x in [im, *turned, originals[4]]]
    on = dedup.group_images(["a", "b", "c", "d"], sigs).group
    off = dedup.group_images(["a", "b", "c", "d"], sigs, flips=False).group
    assert on[0] == on[1] == on[2] != on[3]
    assert len(set(off.tolist())) == 4
    # the perceptual hash is the same for all 8 flips and turns
    grey = np.asarray(im.convert("L").resize((32, 32)), dtype=np.float64)
    bits = dedup.phash_bits(dedup._dihedral(grey))  # (8, 64)
    assert (bits == bits[0]).all()


def test_a_chain_of_gradual_changes_does_not_become_one_group(family, request):
    # a0 -> a10: each step blends 10% more of another image in; neighbours pass the check, the ends do not.
    name, originals = family
    if name == "scans":
        request.applymarker(
            pytest.mark.xfail(
                strict=True,
                reason=(
                    "the ends stay apart, but the largest group holds 7 of the 11 blends (0.4-1.0): the second "
                    "drawing's dark lines dominate each blend from 0.4 on, so the middle one passes the strict "
                    "check (detail similarity 0.76-0.99) against each of the others and all of them pass the "
                    "looser all-pairs check among themselves"
                ),
            )
        )
    a, b = (np.asarray(originals[k], dtype=np.float64) for k in (2, 20))
    chain = [Image.fromarray((a * (1 - t) + b * t).round().astype(np.uint8)) for t in np.linspace(0, 1, 11)]
    sigs = [_signature(x) for x in chain]
    grouping = dedup.group_images([f"c{k}" for k in range(11)], sigs)
    g = grouping.group
    assert g[0] != g[10]
    assert np.bincount(g).max() <= 6
    # ... whereas joining every verified pair would have chained them all
    parent = list(range(11))

    def find(x):
        while parent[x] != x:
            x = parent[x]
        return x

    for i, j, *_ in grouping.pairs:
        parent[find(j)] = find(i)
    assert len({find(k) for k in range(11)}) == 1
    assert grouping.n_blocked >= 1


def test_exact_copies_always_grouped_and_modes():
    rng = np.random.default_rng(0)
    sigs = [
        dedup.Signature(
            phash=int(rng.integers(0, 2**63)),
            hist=rng.random(dedup.HIST_DIM).astype(np.float32),
            thumb=rng.integers(0, 256, (dedup.THUMB, dedup.THUMB), dtype=np.uint8),
            fine=rng.integers(0, 256, (dedup.FINE, dedup.FINE), dtype=np.uint8),
            views=rng.standard_normal((len(dedup.VIEWS), dedup.VIEW_GRID**2)).astype(np.float16),
        )
        for _ in range(5)
    ]
    sha1s = ["a", "b", "a", "c", "b"]
    assert dedup.group_images(sha1s, sigs).group.tolist() == [0, 1, 0, 2, 1]
    exact = dedup.group_images(sha1s, None, mode="exact")
    assert exact.group.tolist() == [0, 1, 0, 2, 1] and exact.n_candidates == 0
    assert [(p.i, p.j, p.check) for p in exact.pairs] == [(0, 2, "exact"), (1, 4, "exact")]
    off = dedup.group_images(sha1s, None, mode="off")
    assert off.group.tolist() == [0, 1, 2, 3, 4] and off.pairs == []


def test_candidate_pairs_find_close_codes_with_bounded_work():
    rng = np.random.default_rng(1)
    base = rng.integers(0, 2**63, 3000, dtype=np.uint64) * np.uint64(2) + rng.integers(0, 2, 3000, dtype=np.uint64)
    flips = np.zeros(200, dtype=np.uint64)
    for k in range(200):  # 200 near copies, each 1-3 bits away from its source
        for bit in rng.choice(64, size=int(rng.integers(1, 4)), replace=False):
            flips[k] |= np.uint64(1) << np.uint64(int(bit))
    codes = np.concatenate([base, base[:200] ^ flips])
    i, j = dedup.candidate_pairs(codes)
    found = set(zip(i.tolist(), j.tolist()))
    assert all((k, 3000 + k) in found for k in range(200))
    assert len(found) <= 2 * 3 * len(codes)  # each code's 3 nearest
    assert (i < j).all() and len(found) == len(i)
    # max_bits drops the far ones (random pairs differ in ~32 bits)
    i2, j2 = dedup.candidate_pairs(codes, max_bits=3)
    assert set(zip(i2.tolist(), j2.tolist())) >= {(k, 3000 + k) for k in range(200)}
    assert len(i2) < 0.2 * len(i)
    np.testing.assert_array_equal(dedup._popcount64(codes[:100]), [bin(int(v)).count("1") for v in codes[:100]])


def test_candidate_pairs_see_past_a_run_of_look_alikes():
    # The demo's planted copy Hispa/hi_0041 of hi_0042 (plain, per_class=100, seed 0): 6 bits apart in
    # the perceptual hash, its source's second nearest code, yet not next to it in any banded order, since
    # look-alikes sharing a band sat between them. Here: y differs from x in the top bit of bands 1-6;
    # 12 look-alikes share bands 0 and 7 with x and sort between x and y in both of those orders, while
    # differing from x in about 20 bits elsewhere.
    rng = np.random.default_rng(4)

    def code(byte_list):
        return np.uint64(int.from_bytes(bytes(byte_list), "big"))

    x = [int(v) for v in rng.integers(0, 128, 8)]
    x[1] = 0
    y = [v ^ 0x80 if 1 <= b <= 6 else v for b, v in enumerate(x)]
    alike = [[x[0], int(rng.integers(1, 128)), *(int(v) for v in rng.integers(0, 256, 5)), x[7]] for _ in range(12)]
    others = rng.integers(0, 2**63, 300, dtype=np.uint64)
    codes = np.concatenate([[code(x), code(y)], [code(z) for z in alike], others]).astype(np.uint64)
    assert dedup.popcount(codes[0] ^ codes[1]) == 6
    old = dedup.candidate_pairs(codes, window=2, per_image=len(codes), max_bits=12)  # the order's neighbours
    assert (0, 1) not in set(zip(*(v.tolist() for v in old)))
    i, j = dedup.candidate_pairs(codes, max_bits=12)
    assert (0, 1) in set(zip(i.tolist(), j.tolist()))


def test_plain_look_alikes_that_pass_the_thumbnail_check_stay_apart():
    # Distinct leaves of the plain demo (per_class=100, seed=0) that pass the 72 px check (detail
    # similarity 0.73-0.86) and were grouped by it, two of them across classes; a moved copy of one of
    # them, which passes it only in that band too, is still grouped with its source, and so are two
    # moved copies that share fewer than 15 keypoint inliers with theirs (plain leaves have few
    # keypoints): the 128 px check confirms them.
    names = ["bs_0014", "he_0096", "bs_0067", "he_0115", "he_0126", "he_0032", "he_0078", "he_0113", "he_0130"]
    jobs = {job.relpath.split("/")[-1][:-4]: job for job in demo._plan(100, 0)}
    data = [demo._render_job(jobs[n], SIZE, 0, "plain")[1] for n in names]
    images = [_decode(d) for d in data]
    moved = _decode(demo.copy_image(Image.open(io.BytesIO(data[2])), "shift", np.random.default_rng(3))[0])
    rng = np.random.default_rng(0)
    shifted = [_decode(demo.copy_image(Image.open(io.BytesIO(d)), "shift", rng)[0]) for d in data[:7]]
    sigs = [_signature(im) for im in [*images, moved, shifted[3], shifted[6]]]
    n = len(names)
    i, j = np.triu_indices(n, 1)
    checked = dedup.verify_pairs(np.stack([s.thumb for s in sigs]), i, j)
    passed = (checked.similarity >= dedup.DEFAULT_MIN_SIMILARITY) & (checked.outline >= dedup.DEFAULT_MIN_OUTLINE)
    assert passed.sum() >= 3  # the thumbnail check alone would join them
    g = dedup.group_images([f"x{k}" for k in range(len(sigs))], sigs).group
    assert len(set(g[:n].tolist())) == n, dict(zip(names, g[:n].tolist()))
    assert g[n] == g[2] and g[n + 1] == g[3] and g[n + 2] == g[6], g.tolist()
    thumbs, fines = np.stack([s.thumb for s in sigs]), np.stack([s.fine for s in sigs])
    src, cp = np.array([2, 3, 6]), np.array([n, n + 1, n + 2])
    moved_check = dedup.verify_pairs(thumbs, src, cp)
    assert (
        (dedup.DEFAULT_MIN_SIMILARITY <= moved_check.similarity) & (moved_check.similarity < dedup._AMBIGUOUS)
    ).all()
    assert (dedup.keypoint_inliers(fines, src[1:], cp[1:], moved_check.orientation[1:]) < dedup._MIN_INLIERS).all()


def test_a_flipped_and_a_moved_copy_of_one_source_join_it():
    # A scan (scans demo, per_class=10, seed 7, lb_0005), its mirror image and a copy moved by (-9.3,
    # +5.2) px: at 12 px the moved copy looks most like the mirror image unflipped, so their check fails
    # (outline 0.64) and the chain guard kept the moved copy out of the group of the other two; the guard
    # now checks such pairs again with every flip and turn aligned from their keypoints.
    job = next(j for j in demo._plan(10, 7) if j.relpath.endswith("lb_0005.jpg"))
    source = Image.open(io.BytesIO(demo._render_job(job, SIZE, 7, "scans")[1])).convert("L")

    def jpeg(im: Image.Image) -> bytes:
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=90)
        return buf.getvalue()

    flipped = jpeg(source.transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    moved = jpeg(
        source.transform(source.size, Image.Transform.AFFINE, (1, 0, 9.3, 0, 1, -5.2), Image.Resampling.BILINEAR)
    )
    sigs = [_signature(_decode(b)) for b in (jpeg(source), flipped, moved)]
    thumbs, fines = np.stack([s.thumb for s in sigs]), np.stack([s.fine for s in sigs])
    one, two = np.array([1]), np.array([2])
    first = dedup.check_pairs(thumbs, fines, one, two, need=0.7, min_outline=0.9)[1]
    every = dedup.check_pairs(thumbs, fines, one, two, need=0.7, min_outline=0.9, every_turn=True)[1]
    assert not first[0] and every[0]
    assert dedup.group_images(["a", "b", "c"], sigs).group.tolist() == [0, 0, 0]


def test_noisy_small_copies_are_grouped_by_their_keypoints(tmp_path):
    """Small (96 px) leaf photos with sensor noise, each copy 8% brighter, moved by 2 px and re-encoded at
    quality 75: noise takes the detail similarity under 0.7, but their keypoints agree (33-160 inliers in
    BENCHMARKS 7), so each copy joins its source, and no two originals join."""
    from PIL import ImageEnhance

    root = demo.generate_demo(tmp_path / "set", per_class=4, size=96, seed=3, family="field", workers=1)
    rng = np.random.default_rng(0)
    originals = []
    near = {d["path"] for d in __import__("json").loads((root / demo.MARKER).read_text())["near_duplicates"]}
    for p in sorted(q for q in root.glob("*/*.jpg") if q.relative_to(root).as_posix() not in near):
        arr = np.asarray(Image.open(p).convert("RGB"), dtype=np.float64)
        noisy = Image.fromarray(np.clip(arr + rng.normal(0, 6, arr.shape), 0, 255).astype(np.uint8))
        buf = io.BytesIO()
        noisy.save(buf, format="JPEG", quality=90)
        originals.append(buf.getvalue())
    copies = []
    for data in originals[:6]:
        im = ImageEnhance.Brightness(_decode(data)).enhance(1.08)
        im = im.transform(im.size, Image.Transform.AFFINE, (1, 0, -2, 0, 1, -2), Image.Resampling.BILINEAR)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=75)
        copies.append(buf.getvalue())
    sigs = [_signature(_decode(d)) for d in originals + copies]
    grouping = dedup.group_images([f"x{k}" for k in range(len(sigs))], sigs)
    n = len(originals)
    assert [grouping.group[n + k] == grouping.group[k] for k in range(6)] == [True] * 6
    assert len(set(grouping.group[:n].tolist())) == n
