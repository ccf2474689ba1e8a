"""Tests of the embedded world: generator, captions, tokenizer, datasets, episodes, pretraining,
and the shipped world CLIP checkpoint."""

from __future__ import annotations

import argparse
import json
import random
import re
import time

import numpy as np
import pytest
import torch
from PIL import Image

from clipadapt.exceptions import ConfigError
from clipadapt.world.captions import (
    BACKGROUND_WORDS,
    NUMBERS,
    ORIENT_ADJ,
    SIZE_WORDS,
    caption,
    relation,
)
from clipadapt.world.datasets import (
    COUNT_CLASSES,
    WORLD_AUGMENTATION,
    WORLD_DATASETS,
    generate_world_datasets,
    kind_table,
    read_dataset,
    species_table,
    world_tasks,
)
from clipadapt.world.episodes import generate_episodes
from clipadapt.world.generator import (
    COLOURS,
    PLURAL,
    SHAPES,
    SIZES,
    WorldGenerator,
    WorldObject,
    render,
    sample_scene,
)
from clipadapt.world.pretrain import (
    MODEL_NAME,
    assets_dir,
    create_world_model,
    images_to_tensor,
    load_world_model,
    pretrain,
    read_card,
)
from clipadapt.world.texts import NEGATIVE_TEMPLATE, TEMPLATES, world_tokenizer
from clipadapt.world.tokenizer import WordTokenizer, split_words, tokenizer_from_card

SHIPPED_CARD = assets_dir() / "world_clip.json"
SHIPPED_CKPT = assets_dir() / "world_clip.safetensors"

# ----------------------------------------------------------------------------- generator


def test_generator_is_deterministic_given_seed() -> None:
    gen = WorldGenerator()
    a_img, a_cap, a_scn = gen.batch(24, seed=7)
    b_img, b_cap, b_scn = gen.batch(24, seed=7)
    c_img, c_cap, _ = gen.batch(24, seed=8)
    assert np.array_equal(a_img, b_img) and a_cap == b_cap and a_scn == b_scn
    assert not np.array_equal(a_img, c_img) and a_cap != c_cap
    assert a_img.shape == (24, 64, 64, 3) and a_img.dtype == np.uint8


def test_generator_speed_floor() -> None:
    # Single-core CPU time (process_time) so other processes on a shared machine do not count;
    # an idle core measured ~3,000 images/s with captions. The floor leaves room for slow CPUs.
    gen = WorldGenerator()
    gen.batch(64, seed=0)  # warm the asset caches
    t0 = time.process_time()
    gen.batch(600, seed=1)
    rate = 600 / (time.process_time() - t0)
    assert rate >= 1000, f"{rate:.0f} images/s"


def test_render_draws_the_object_in_its_colour() -> None:
    obj = WorldObject("square", "red", "solid", "large", 10, 20)
    scene = sample_scene(random.Random(0), 1)._replace(objects=(obj,), background="dark")
    img = render(scene).astype(int)
    s = SIZES["large"]
    centre = img[20 + s // 2, 10 + s // 2]
    assert np.abs(centre - np.array(COLOURS["red"])).max() <= 14
    assert img[2, 60].max() < 80  # dark background away from the object
    for style in ("sketch", "noise", "invert", "newbg"):
        assert render(scene, style, seed=1).shape == (64, 64, 3)
    assert np.array_equal(render(scene, "invert", 3), 255 - render(scene, "normal", 3))
    with pytest.raises(ValueError, match="style"):
        render(scene, "blurry")


def test_shades_are_paler_or_deeper_versions_of_the_colour() -> None:
    from clipadapt.world.generator import SHADES, shade_rgb

    scene = sample_scene(random.Random(0), 1)._replace(background="dark")
    s = SIZES["large"]
    centres = {}
    for shade in SHADES:
        obj = WorldObject("square", "blue", "solid", "large", 10, 20, shade=shade)
        img = render(scene._replace(objects=(obj,)), seed=4).astype(int)
        centres[shade] = img[20 + s // 2, 10 + s // 2]
        assert np.abs(centres[shade] - shade_rgb("blue", shade)).max() <= 14
    # same hue order (blue channel brightest), lightness pale > normal > deep
    assert all(int(np.argmax(c)) == 2 for c in centres.values())
    assert centres["pale"].sum() > centres["normal"].sum() > centres["deep"].sum()
    with pytest.raises(ValueError, match="shade"):
        shade_rgb("blue", "neon")
    drawn = [sample_scene(random.Random(i), 1).objects[0].shade for i in range(1000)]
    assert 120 < drawn.count("pale") < 280 and 120 < drawn.count("deep") < 280


# ----------------------------------------------------------------------------- captions


def _words_of(table: dict[str, tuple[str, ...]]) -> dict[str, set[str]]:
    return {k: {w for v in vals for w in split_words(v)} for k, vals in table.items()}


@pytest.mark.parametrize("n_objects", [1, 2])
def test_captions_name_the_true_attributes(n_objects: int) -> None:
    rng = random.Random(3)
    always = dict(p_size=1.0, p_colour=1.0, p_texture=1.0, p_position=1.0, p_background=1.0)
    for _ in range(200):
        scene = sample_scene(rng, n_objects)
        text = caption(scene, rng, **always, p_relation=1.0, p_count=1.0)
        words = set(split_words(text))
        # Colours named are exactly the scene's colours.
        assert words & set(COLOURS) == {o.colour for o in scene.objects}, text
        shapes = {s for s in SHAPES if s in words or PLURAL[s] in words}
        assert shapes <= {o.shape for o in scene.objects}, text
        bg_words = _words_of(BACKGROUND_WORDS)[scene.background]
        assert words & bg_words, text
        for obj in scene.objects:
            assert words & set(split_words(" ".join(SIZE_WORDS[obj.size]))), text
        if n_objects == 1:
            assert re.search(r"\b(on the|at the|near the|in the)\b", text), text


def test_two_object_captions_state_the_true_relation() -> None:
    rng = random.Random(5)
    checked = 0
    for _ in range(300):
        scene = sample_scene(rng, 2)
        if scene.objects[0].look == scene.objects[1].look:
            continue
        text = caption(scene, rng, p_relation=1.0, p_colour=1.0, p_size=0, p_texture=0)
        a, b = scene.objects
        ca, cb = a.colour, b.colour
        if ca == cb or a.shape == b.shape:
            continue  # the order of mention would be ambiguous
        first = text.find(f"{ca} {a.shape}")
        second = text.find(f"{cb} {b.shape}")
        if min(first, second) < 0:
            continue  # a generic noun ("object") replaced a shape
        subject, other = (a, b) if first < second else (b, a)
        rel = relation(subject, other)
        expected = {"left": "left of", "right": "right of", "above": "above|over", "below": ""}
        if rel == "below":
            assert re.search(r"\b(below|under|beneath)\b", text), text
        else:
            assert re.search(rf"\b({expected[rel]})\b", text), text
        checked += 1
    assert checked > 50


def test_shade_words_are_rare_and_right() -> None:
    from clipadapt.world.captions import SHADE_WORDS

    obj = WorldObject("star", "red", "solid", "small", 5, 5, shade="pale")
    scene = sample_scene(random.Random(0), 1)._replace(objects=(obj,))
    texts = [caption(scene, random.Random(i)) for i in range(1000)]
    named = [t for t in texts if " pale red" in t or " pastel red" in t]
    # named with the colour in p_shade = 20 % of the captions that name the colour (85 %)
    assert 100 < len(named) < 260
    assert not any(w in t.split() for t in texts for w in SHADE_WORDS["deep"])
    normal = obj._replace(shade="normal")
    texts = [caption(scene._replace(objects=(normal,)), random.Random(i)) for i in range(300)]
    assert not any(w in t.split() for t in texts for ws in SHADE_WORDS.values() for w in ws)


def test_counts_and_orientation_in_captions() -> None:
    rng = random.Random(11)
    for _ in range(100):
        n = rng.randint(2, 4)
        scene = sample_scene(rng, n, same=True)
        text = caption(scene, rng, p_count=1.0)
        assert NUMBERS[n - 1] in split_words(text), text
    striped = WorldObject("circle", "blue", "striped", "large", 5, 5, "vertical")
    scene = sample_scene(rng, 1)._replace(objects=(striped,))
    texts = [caption(scene, random.Random(i), p_texture=1.0) for i in range(400)]
    oriented = [t for t in texts if "vertical" in t]
    # The orientation is rarer than other attributes by design (default 25 % of named
    # stripes; an attribute named in ~10 % of captions stayed at chance even for a linear
    # probe) but never wrong.
    assert 40 < len(oriented) < 160
    assert not any("horizontal" in t or "diagonal" in t for t in texts)
    assert all(ORIENT_ADJ["vertical"] in t or "vertical stripes" in t for t in oriented)


def test_twin_scenes_change_one_hidden_attribute_and_their_captions_say_so() -> None:
    from clipadapt.world.captions import relation as relation_of
    from clipadapt.world.generator import twin_scene

    rng = random.Random(5)
    kinds = set()
    for _ in range(300):
        scene = sample_scene(rng)
        result = twin_scene(scene, rng)
        if result is None:
            continue
        twin, kind = result
        kinds.add(kind)
        assert twin.background == scene.background and len(twin.objects) == len(scene.objects)
        pairs = list(zip(scene.objects, twin.objects, strict=True))
        assert all(a.colour == b.colour and a.size == b.size for a, b in pairs)
        if kind == "shape":
            assert any(a.shape != b.shape for a, b in pairs)
            assert all(a[1:] == b[1:] for a, b in pairs)
        elif kind == "texture":
            assert any(a.texture != b.texture for a, b in pairs)
            assert all(a.shape == b.shape and (a.x, a.y) == (b.x, b.y) for a, b in pairs)
        elif kind == "orientation":
            assert any(a.orientation != b.orientation for a, b in pairs)
            assert all(a.shape == b.shape and (a.x, a.y) == (b.x, b.y) for a, b in pairs)
        else:
            a, b = scene.objects
            ta, tb = twin.objects
            assert (ta.shape, tb.shape) == (a.shape, b.shape)
            assert relation_of(ta, tb) != relation_of(a, b) or (ta.x, ta.y) != (a.x, a.y)
    assert kinds == {"shape", "texture", "orientation", "swap"}
    only_swaps = [twin_scene(sample_scene(rng, 2), rng, kinds=("swap",)) for _ in range(20)]
    assert {r[1] for r in only_swaps if r is not None} == {"swap"}
    with pytest.raises(ValueError, match="twin kinds"):
        WorldGenerator(twin_kinds=("colour",))

    images, captions, scenes = WorldGenerator(twin_prob=1.0).batch(40, seed=2)
    assert len(captions) == len(scenes) == images.shape[0] == 40
    for first, second, s1, s2 in zip(
        captions[::2], captions[1::2], scenes[::2], scenes[1::2], strict=True
    ):
        if s1 == s2:
            continue
        assert first != second, (first, second)  # the changed attribute is always named
    # a texture twin keeps every other phrasing choice: its caption differs in texture words only
    _, captions, _ = WorldGenerator(twin_prob=1.0, twin_kinds=("texture",)).batch(40, seed=4)
    from clipadapt.world.captions import ORIENT_ADJ, ORIENT_SUFFIX, TEXTURE_ADJ, TEXTURE_SUFFIX

    texture_words = {
        w
        for table in (TEXTURE_ADJ, TEXTURE_SUFFIX)
        for options in table.values()
        for phrase in options
        for w in phrase.split()
    } | {w for table in (ORIENT_ADJ, ORIENT_SUFFIX) for v in table.values() for w in v.split()}

    def rest(text: str) -> list[str]:
        return [w for w in text.replace(",", "").split() if w not in texture_words]

    for first, second in zip(captions[::2], captions[1::2], strict=True):
        assert first != second and rest(first) == rest(second), (first, second)
    # without twins the stream is the plain generator's
    plain = WorldGenerator().batch(6, seed=2)[1]
    assert plain == WorldGenerator(twin_prob=0.0).batch(6, seed=2)[1]


def test_twin_families_vary_one_attribute_with_distinct_values() -> None:
    from clipadapt.world.captions import relation as relation_of
    from clipadapt.world.generator import twin_family

    rng = random.Random(9)
    seen = set()
    for _ in range(300):
        scene = sample_scene(rng)
        result = twin_family(scene, rng, size=4)
        if result is None:
            continue
        twins, kind = result
        seen.add(kind)
        assert 1 <= len(twins) <= 3 and scene not in twins and len(set(twins)) == len(twins)
        for twin in twins:
            pairs = list(zip(scene.objects, twin.objects, strict=True))
            assert all(a.colour == b.colour and a.size == b.size for a, b in pairs)
        if kind == "shape":
            assert len(twins) == 3
            assert len({t.objects for t in twins} | {scene.objects}) == 4
        elif kind == "swap":
            a, b = scene.objects
            relations = {relation_of(*t.objects) for t in twins}
            assert relation_of(ta := twins[0].objects[0], twins[0].objects[1]) != relation_of(a, b)
            assert ta.shape == a.shape and len(relations) == len(twins)
    assert seen == {"shape", "texture", "orientation", "swap"}
    # weights steer the kind; a weight of zero never draws it
    kinds = [
        twin_family(sample_scene(rng, 1), rng, size=3, weights=(1.0, 0.0, 0.0, 0.0))
        for _ in range(50)
    ]
    assert {k for _, k in kinds} == {"shape"}
    # in a batch a family's captions share their phrasing and name the changed attribute
    gen = WorldGenerator(twin_prob=1.0, family_size=4, twin_weights=(1.0, 0.0, 0.0, 0.0))
    _, captions, scenes = gen.batch(16, seed=1)
    for i in range(0, 16, 4):
        family = captions[i : i + 4]
        assert len(set(family)) == 4
        shapes = [{o.shape for o in s.objects} for s in scenes[i : i + 4]]
        for text, names in zip(family, shapes, strict=True):
            assert any(name in text for name in names)
    with pytest.raises(ValueError, match="family_size"):
        WorldGenerator(family_size=1)
    with pytest.raises(ValueError, match="twin_weights"):
        WorldGenerator(twin_weights=(1.0, 2.0))


@pytest.mark.parametrize(
    ("recipe", "captions_sha", "images_sha"),
    [
        ({}, "967a38e46914ea53", "80e68d51b6f4ae9b"),
        # the shipped checkpoint's recipe (see its model card)
        ({"twin_prob": 0.5}, "ed1901e79bf9af4e", "9932580d2d6cd317"),
    ],
)
def test_pretraining_streams_are_stable(recipe, captions_sha, images_sha) -> None:
    """A recorded checkpoint command must keep drawing the batches it was trained on."""
    import hashlib

    images, captions, _ = WorldGenerator(**recipe).batch(128, seed=0)
    assert hashlib.sha256(json.dumps(captions).encode()).hexdigest()[:16] == captions_sha
    assert hashlib.sha256(images.tobytes()).hexdigest()[:16] == images_sha


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip_and_special_ids(tmp_path) -> None:
    tok = world_tokenizer()
    text = "A small red striped triangle, left of a blue circle!"
    ids = tok(text)
    assert ids.shape == (1, tok.context_length) and ids.dtype == torch.long
    assert tok.decode(ids[0]) == "a small red striped triangle left of a blue circle"
    assert ids[0, 0] == tok.start_id and int(ids.argmax(-1)) == len(split_words(text)) + 1
    assert tok.end_id == tok.vocab_size - 1 == int(ids.max())
    assert tok("a florp")[0, 2] == tok.unk_id
    long = tok(" ".join(["red"] * 100), context_length=8)
    assert long.shape == (1, 8) and long[0, -1] == tok.end_id
    tok.save(tmp_path / "vocab.json")
    again = WordTokenizer.load(tmp_path / "vocab.json")
    assert torch.equal(again([text, "two stars"]), tok([text, "two stars"]))
    by_file = tokenizer_from_card({"type": "word", "vocab_file": "vocab.json"}, tmp_path)
    assert by_file.itos == tok.itos


def test_vocabulary_covers_every_world_text(tmp_path) -> None:
    tok = world_tokenizer()
    _, captions, _ = WorldGenerator().batch(1500, seed=2)
    assert not tok.unknown_words(captions)
    texts = [NEGATIVE_TEMPLATE.format("velk")]
    for folder in generate_world_datasets(tmp_path, size="small", names=list(WORLD_DATASETS[:5])):
        meta, _ = read_dataset(folder)
        for c in meta["classnames"]:
            texts += [t.format(c) for t in meta["templates"]]
            texts.append(NEGATIVE_TEMPLATE.format(c))
        if meta.get("descriptions"):
            desc = json.loads((folder / meta["descriptions"]).read_text())
            texts += [s for sents in desc.values() for s in sents]
    assert not tok.unknown_words(texts)
    assert max(len(split_words(t)) for t in texts) <= tok.context_length - 2


# ----------------------------------------------------------------------------- datasets


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    return root, generate_world_datasets(root, size="small", seed=0)


def test_dataset_folders_are_valid(small_world) -> None:
    root, paths = small_world
    assert [p.name for p in paths] == list(WORLD_DATASETS) and len(paths) >= 5
    for path in paths:
        meta, split = read_dataset(path)
        assert meta["name"] == path.name
        assert "{}" in meta["template"] and all("{}" in t for t in meta["templates"])
        classes = meta["classnames"]
        assert len(set(classes)) == len(classes)
        for rows in split.values():
            for rel, label, classname in rows:
                assert classes[label] == classname and (path / rel).is_file()
        labels = {r[1] for r in split["test"]}
        assert labels == set(range(len(classes)))
        with Image.open(path / split["test"][0][0]) as im:
            assert im.size == (64, 64) and im.mode == "RGB"
        if meta.get("domain_of"):
            assert meta["domain_of"] == "world_species" and not split["train"]
        else:
            assert {r[1] for r in split["train"]} == set(range(len(classes)))
    composite = json.loads((root / "world_composite" / "dataset.json").read_text())
    assert len(composite["classnames"]) >= 50
    species = json.loads((root / "world_species" / "dataset.json").read_text())
    desc = json.loads((root / "world_species" / species["descriptions"]).read_text())
    assert set(desc) == set(species["classnames"])
    table = species_table(0)
    for sp in table:  # every description set names the species' colour and shape
        joined = " ".join(desc[sp.name])
        assert sp.colour in joined and sp.shape in joined


def test_generation_is_cached_and_deterministic(small_world, tmp_path) -> None:
    root, paths = small_world
    stamp = (root / "world_count" / "split.json").stat().st_mtime_ns
    t0 = time.perf_counter()
    generate_world_datasets(root, size="small", seed=0)
    assert time.perf_counter() - t0 < 2.0
    assert (root / "world_count" / "split.json").stat().st_mtime_ns == stamp
    again = generate_world_datasets(tmp_path, size="small", seed=0, names=["world_count"])[0]
    rel = json.loads((again / "split.json").read_text())["test"][-1][0]
    assert (again / rel).read_bytes() == (root / "world_count" / rel).read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left
    with pytest.raises(ConfigError, match="size"):
        generate_world_datasets(tmp_path, size="huge")
    with pytest.raises(ConfigError, match="unknown world datasets"):
        generate_world_datasets(tmp_path, names=["nope"])


def test_species_and_kind_names_are_unseen_in_captions() -> None:
    _, captions, _ = WorldGenerator(twin_prob=0.5).batch(500, seed=4)
    words = {w for c in captions for w in split_words(c)}
    assert not words & {sp.name for sp in species_table(0)}
    assert not words & {k.name for k in kind_table(0)}
    # nor are the sameness words of the count classes: only group phrasings hint at them
    assert not words & {"identical", "different", "same", "alike", "unlike", "mixed"}


def _task(name: str):
    return next(t for t in world_tasks(0) if t.name == name)


def test_count_classes_draw_identical_copies_or_all_different_objects() -> None:
    task = _task("world_count")
    assert task.classnames[:3] == ["one shape", "two identical shapes", "two different shapes"]
    assert len(task.classnames) == len(COUNT_CLASSES) == 7
    for label, (count, alike) in enumerate(COUNT_CLASSES):
        for i in range(30):
            objs = task.sample(label, random.Random(i)).objects
            assert len(objs) == count
            looks = {(o.shape, o.colour, o.texture, o.size) for o in objs}
            if alike:
                assert len(looks) == 1
            elif alike is False:
                assert len({(o.shape, o.colour) for o in objs}) == count
    desc = task.descriptions
    assert "group" in " ".join(desc["three identical shapes"])
    assert "group" not in " ".join(desc["three different shapes"])


def test_composite_kinds_are_colour_habitat_size_combinations() -> None:
    table = kind_table(0)
    assert len(table) == 60 and len({(k.colour, k.background, k.size) for k in table}) == 60
    per_colour = {c: sum(k.colour == c for k in table) for c in COLOURS}
    assert set(per_colour.values()) == {7, 8}
    assert kind_table(0) == table and kind_table(1) != table
    task = _task("world_composite")
    assert task.classnames == [k.name for k in table]
    shapes, textures = set(), set()
    for label in (0, 17, 59):
        kind = table[label]
        for i in range(20):
            scene = task.sample(label, random.Random(i))
            target, *rest = scene.objects
            assert scene.background == kind.background
            assert (target.colour, target.size, target.shade) == (kind.colour, kind.size, "normal")
            assert all(o.colour != kind.colour and o.size == "small" for o in rest)
            shapes.add(target.shape)
            textures.add(target.texture)
        sentences = task.descriptions[kind.name]
        assert sum(kind.colour in t for t in sentences) >= 5  # colour named most often
    assert len(shapes) > 4 and len(textures) == 4  # a kind comes in any shape and pattern


def test_bigger_classes_fix_which_colour_is_the_large_object() -> None:
    from clipadapt.world.datasets import BIGGER_CLASSES, BIGGER_PAIRS

    task = _task("world_bigger")
    assert len(task.classnames) == 2 * len(BIGGER_PAIRS) == 12
    assert task.classnames[:2] == [
        "a large red shape and a small blue shape",
        "a large blue shape and a small red shape",
    ]
    assert {c for pair in BIGGER_PAIRS for c in pair} == set(COLOURS)
    shapes = set()
    for label, (large, small) in enumerate(BIGGER_CLASSES):
        for i in range(10):
            big, little = task.sample(label, random.Random(i)).objects
            assert (big.colour, big.size, little.colour, little.size) == (
                large,
                "large",
                small,
                "small",
            )
            assert big.shade == little.shade == "normal"
            shapes.add(big.shape)
        sentences = task.descriptions[task.classnames[label]]
        assert all(large in t and small in t for t in sentences)
    assert len(shapes) > 4  # any shape: only colour and size tell the classes apart


def test_shade_classes_fix_colour_and_shade_only() -> None:
    from clipadapt.world.generator import SHADES

    task = _task("world_shades")
    assert len(task.classnames) == len(COLOURS) * len(SHADES) == 24
    assert task.classnames[:3] == ["pale red shape", "red shape", "deep red shape"]
    for label, name in enumerate(task.classnames):
        colour = name.split()[-2]
        shade = name.split()[0] if len(name.split()) == 3 else "normal"
        objs = [task.sample(label, random.Random(i)).objects for i in range(10)]
        assert all(len(o) == 1 and (o[0].colour, o[0].shade) == (colour, shade) for o in objs)
        assert colour in " ".join(task.descriptions[name])


# ----------------------------------------------------------------------------- episodes


def test_episodes_file_format(tmp_path) -> None:
    path = generate_episodes(tmp_path / "eps.json", n_episodes=3, n_support=2, n_query=3)
    doc = json.loads(path.read_text())
    assert doc["format"] == "clipadapt-world-episodes" and doc["version"] == 1
    assert [e["concept"]["type"] for e in doc["episodes"]] == ["conjunction", "relation", "count"]
    root = tmp_path / doc["image_root"]
    for ep in doc["episodes"]:
        assert sorted(i["label"] for i in ep["support"]) == [0, 0, 1, 1]
        assert sorted(i["label"] for i in ep["query"]) == [0, 0, 0, 1, 1, 1]
        assert all((root / i["image"]).is_file() for i in ep["support"] + ep["query"])
    again = generate_episodes(tmp_path / "b.json", n_episodes=3, n_support=2, n_query=3)
    assert json.loads(again.read_text())["episodes"] == doc["episodes"]
    with pytest.raises(ConfigError):
        generate_episodes(tmp_path / "c.json", concepts=("telepathy",))


# ----------------------------------------------------------------------------- pretraining


def _batch_loss(model: torch.nn.Module, seed: int) -> float:
    import open_clip

    images, captions, _ = WorldGenerator().batch(32, seed=seed)
    with torch.no_grad():
        img = model.encode_image(images_to_tensor(images), normalize=True)
        txt = model.encode_text(world_tokenizer()(captions), normalize=True)
        return float(open_clip.ClipLoss()(img, txt, 10.0))


@pytest.mark.slow
def test_tiny_pretraining_lowers_the_contrastive_loss(tmp_path) -> None:
    card = pretrain(
        tmp_path / "tiny.safetensors",
        steps=8,
        batch_size=32,
        lr=2e-3,
        warmup=2,
        log_every=4,
        threads=1,
    )
    assert card["steps_done"] == 8 and len(card["loss_curve"]) == 2
    torch.manual_seed(0)
    before = create_world_model().train()
    after, _, _ = load_world_model(tmp_path / "tiny.json")
    after.train()  # batch-norm on batch statistics, as in training (8 steps barely move the EMA)
    # The first training batch (seed 0 * 1000003 + 0), scored at a fixed temperature.
    assert _batch_loss(after, 0) < _batch_loss(before, 0) - 0.05
    more = pretrain(
        tmp_path / "more.safetensors",
        steps=2,
        batch_size=16,
        warmup=1,
        threads=1,
        init=tmp_path / "tiny.safetensors",
        step_offset=8,
    )
    assert more["init_card"]["steps"] == 8 and more["step_offset"] == 8
    with pytest.raises(ConfigError):
        pretrain(tmp_path / "x.safetensors", steps=0)
    with pytest.raises(ConfigError, match="does not exist"):
        pretrain(tmp_path / "y.safetensors", steps=1, init=tmp_path / "missing.safetensors")


def test_cli_group_generates_datasets(tmp_path, capsys) -> None:
    from clipadapt.world.cli import register_cli

    parser = argparse.ArgumentParser()
    register_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        [
            "world",
            "generate",
            "--out",
            str(tmp_path),
            "--size",
            "small",
            "--datasets",
            "world_count",
        ]
    )
    assert args.handler(args) == 0
    assert "world_count: train 28, val 14, test 28" in capsys.readouterr().out
    args = parser.parse_args(["world", "pretrain", "--out", str(tmp_path / "m.bin")])
    with pytest.raises(ConfigError, match="safetensors"):
        args.handler(args)
    out = str(tmp_path / "m.safetensors")
    for flags, message in (
        (["--family-size", "1"], "family-size"),
        (["--twin-weights", "1,2"], "twin-weights"),
        (["--twin-weights", "a,b,c,d"], "twin-weights"),
    ):
        args = parser.parse_args(["world", "pretrain", "--out", out, *flags])
        with pytest.raises(ConfigError, match=message):
            args.handler(args)
    assert not (tmp_path / "m.safetensors").exists()


# ----------------------------------------------------------------------------- shipped model

needs_checkpoint = pytest.mark.skipif(
    not (SHIPPED_CARD.is_file() and SHIPPED_CKPT.is_file()),
    reason="the world checkpoint has not been produced yet",
)


@needs_checkpoint
def test_shipped_checkpoint_card_and_size() -> None:
    card = read_card()
    assert card["model_name"] == MODEL_NAME and card["complete"]
    assert SHIPPED_CKPT.stat().st_size <= 15 * 2**20
    for key in ("config", "seed", "steps", "data_recipe", "command", "loss_curve", "evaluation"):
        assert key in card, key
    curve = card["loss_curve"]
    assert curve[-1]["loss"] < curve[0]["loss"]
    model, preprocess, tokenizer = load_world_model()
    assert tokenizer.vocab_size <= card["config"]["text_cfg"]["vocab_size"]
    image = Image.fromarray(WorldGenerator().batch(1, seed=0)[0][0])
    feats = model.encode_image(preprocess(image)[None])
    assert feats.shape == (1, card["config"]["embed_dim"]) and torch.isfinite(feats).all()


@needs_checkpoint
@pytest.mark.slow
def test_shipped_zero_shot_matches_the_card(tmp_path) -> None:
    from clipadapt.world.evaluate import evaluate_world_model

    card = read_card()
    report = evaluate_world_model(
        data_root=tmp_path, names=["world_species"], probe_attributes=False
    )
    got = report["datasets"]["world_species"]["zero_shot"]
    want = card["evaluation"]["datasets"]["world_species"]["zero_shot"]
    for text in ("name", "descriptions"):
        assert abs(got[text] - want[text]) <= 1.0, (text, got, want)
    assert TEMPLATES[0] == "a photo of a {}."


@needs_checkpoint
def test_attribute_probes_see_what_the_shipped_features_carry() -> None:
    from clipadapt.world.evaluate import attribute_probes

    model, _, _ = load_world_model()
    probes = attribute_probes(model, n_images=900)
    assert set(probes) == {
        "colour",
        "shape",
        "texture",
        "size",
        "shade",
        "background",
        "orientation",
        "count",
        "relation",
        "bigger",
    }
    # what docs/world.md says the shipped features carry, with margins for the smaller sample
    assert probes["colour"]["probe_all"] > 90 and probes["background"]["probe_all"] > 90
    assert probes["count"]["probe_all"] > 3 * probes["count"]["chance"]
    assert probes["size"]["probe_all"] > 2 * probes["size"]["chance"]
    assert probes["shade"]["probe_all"] > 1.3 * probes["shade"]["chance"]
    assert probes["bigger"]["probe_all"] > 1.3 * probes["bigger"]["chance"]
    assert all(
        0 <= p["probe_16"] <= 100 and p["classes"] >= (2 if name == "bigger" else 3)
        for name, p in probes.items()
    )


@needs_checkpoint
@pytest.mark.slow
def test_every_world_task_is_learnable_from_the_shipped_features() -> None:
    """A demo task at chance teaches nothing: each source task's 16-shot linear probe on the
    shipped features must be well above chance (world_relation's was not: 10.6 % vs 8.3 %)."""
    from clipadapt.world.evaluate import accuracy, fit_linear_probe, probe_logits

    model, _, _ = load_world_model()
    torch.set_num_threads(1)
    for task in world_tasks(0):
        if task.domain_of:
            continue
        n_classes = len(task.classnames)
        scenes = {
            split: [
                task.sample(label, random.Random(f"learnable/{split}/{label}/{i}"))
                for label in range(n_classes)
                for i in range(n)
            ]
            for split, n in (("train", 16), ("test", 10))
        }
        with torch.no_grad():
            feats = {
                split: torch.nn.functional.normalize(
                    model.encode_image(
                        images_to_tensor(
                            np.stack([render(sc, "normal", i) for i, sc in enumerate(v)])
                        )
                    ).float(),
                    dim=-1,
                )
                for split, v in scenes.items()
            }
        y = {
            split: torch.arange(n_classes).repeat_interleave(n)
            for split, n in (("train", 16), ("test", 10))
        }
        w = fit_linear_probe(feats["train"], y["train"], n_classes, 1e-3)
        acc = accuracy(probe_logits(w, feats["test"]), y["test"])
        assert acc > 3 * 100 / n_classes, (task.name, acc)


@needs_checkpoint
def test_shipped_checkpoint_loads_through_the_encoder() -> None:
    clip = pytest.importorskip("clipadapt.encoders.clip")
    encoder = clip.ClipEncoder(clip.resolve_backbone("world"), device="cpu")
    model, preprocess, tokenizer = load_world_model()
    texts = ["a photo of a red circle.", "a photo of a velk."]
    with torch.no_grad():
        ours = model.encode_text(tokenizer(texts))
    theirs = encoder.encode_text(texts)
    assert torch.allclose(ours, theirs.cpu(), atol=1e-4)
    assert tuple(encoder.mean) == tuple(read_card()["mean"])


@pytest.fixture(scope="module")
def world_bundles(tmp_path_factory):
    """world_species and world_count at the demo's size, extracted as the demo does (10 views
    per train image, the dataset's descriptions) with the shipped world CLIP, through a fresh
    cache; world_count's train rows only."""
    from clipadapt.features.extract import extract_dataset
    from clipadapt.features.pipeline import load_encoder, open_dataset

    if not (SHIPPED_CARD.is_file() and SHIPPED_CKPT.is_file()):
        pytest.skip("the world checkpoint has not been produced yet")
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("world-views")
    encoder = load_encoder("world", device="cpu")
    bundles = {}
    for path in generate_world_datasets(root / "data", names=["world_species", "world_count"]):
        dataset, _, descriptions = open_dataset(str(path))
        bundles[path.name] = (
            dataset,
            extract_dataset(
                dataset,
                encoder,
                root / f"{path.name}.safetensors",
                cache_dir=root / "cache",
                descriptions=descriptions,
                splits=("train", "val", "test") if path.name == "world_species" else ("train",),
                progress=False,
            )[0],
        )
    return bundles


def test_world_views_follow_the_declared_label_preserving_augmentation(world_bundles) -> None:
    """The default views (crops of 50-100 %) cut objects off and enlarge small ones, which
    mislabels views of world_species (fixed sizes) and world_count (the number of objects): a
    class-mean classifier from the clean 16-shot rows scored 4.7 and 9.3 points lower on their
    views. The world datasets declare crops that keep the labels; extraction must follow them."""
    for name, (dataset, bundle) in world_bundles.items():
        assert dataset.augmentation == WORLD_AUGMENTATION
        recorded = json.loads(bundle.metadata["augmentation"])
        assert recorded["scale"] == WORLD_AUGMENTATION["scale"]
        assert recorded["flip"] == WORLD_AUGMENTATION["flip"] and recorded["source"] == "dataset"
        clean = torch.nn.functional.normalize(bundle.tensors["train_features"].float(), dim=-1)
        views = torch.nn.functional.normalize(
            bundle.tensors["train_features_views"].float(), dim=-1
        )
        labels = bundle.tensors["train_labels"]
        means = torch.zeros(dataset.num_classes, clean.shape[1]).index_add_(0, labels, clean)
        on_clean = (clean @ means.T).argmax(-1).eq(labels).float().mean().item()
        on_views = (views @ means.T).argmax(-1).eq(labels).float().mean().item()
        assert on_views >= on_clean - 0.02, (name, on_clean, on_views)


@pytest.mark.parametrize("method", ["hegraph_adapter", "tip_adapter_f", "taskres"])
def test_more_world_shots_do_not_make_view_trained_adapters_worse(world_bundles, method) -> None:
    """Issue 18: on world_species HeGraphAdapter scored 61.3 % at 4 shots and 56.7 % at 16
    (seed 1, the demo's protocol) while it trained on the mislabelled default views."""
    import clipadapt

    _, bundle = world_bundles["world_species"]
    torch.set_num_threads(1)
    adapter = clipadapt.create_method(method)
    acc = {k: clipadapt.evaluate(adapter, bundle, shots=k, seed=1).accuracy for k in (4, 16)}
    assert acc[16] >= acc[4] - 1.0, (method, acc)
