import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF
from transformers import BertTokenizer, BlipTextModel, BlipVisionModel

from lightning_sdrl.rewards.aesthetic import AestheticMLP
from lightning_sdrl.rewards.image_reward import ImageReward, ImageRewardArchitecture, imagereward_key_map

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "cat", "dog", "red", "car", "on"]
VOCAB += ["the", "grass", "##s"]
V, T, LAYERS, HEADS, PATCH, POSITIONS = 48, 32, 2, 2, 8, 40  # vision width != text width: cross-attention reads V
TINY = ImageRewardArchitecture(
    image_size=32,
    patch_size=PATCH,
    vision_width=V,
    vision_layers=LAYERS,
    vision_heads=HEADS,
    text_width=T,
    text_layers=LAYERS,
    text_heads=HEADS,
    vocab_size=len(VOCAB) + 2,  # + [DEC], [ENC]
    max_text_positions=POSITIONS,
)
HEAD_SHAPES = {0: (24, T), 2: (16, 24), 4: (8, 16), 6: (4, 8), 7: (1, 4)}  # nn.Sequential index: (out, in)
PROMPTS = ["a photo of cats", "a red car on the grass"]


def published_state() -> dict[str, torch.Tensor]:
    """A tiny ImageReward.pt state dict in the original key layout, written out by hand."""
    generator = torch.Generator().manual_seed(0)

    def linear(state, name, out_features, in_features):
        state[f"{name}.weight"] = torch.randn(out_features, in_features, generator=generator) * in_features**-0.5
        state[f"{name}.bias"] = torch.randn(out_features, generator=generator) * 0.1

    def norm(state, name, width):
        state[f"{name}.weight"] = 1 + 0.1 * torch.randn(width, generator=generator)
        state[f"{name}.bias"] = 0.1 * torch.randn(width, generator=generator)

    s: dict[str, torch.Tensor] = {}
    vit = "blip.visual_encoder."
    # small patch embeddings (variance ~1e-5), so that the first LayerNorm's eps (1e-6 in BLIP's ViT) matters
    s[f"{vit}cls_token"] = torch.randn(1, 1, V, generator=generator) * 3e-3
    s[f"{vit}pos_embed"] = torch.randn(1, 1 + (32 // PATCH) ** 2, V, generator=generator) * 3e-3
    s[f"{vit}patch_embed.proj.weight"] = torch.randn(V, 3, PATCH, PATCH, generator=generator) * 2e-4
    s[f"{vit}patch_embed.proj.bias"] = torch.randn(V, generator=generator) * 1e-3
    for i in range(LAYERS):
        norm(s, f"{vit}blocks.{i}.norm1", V)
        linear(s, f"{vit}blocks.{i}.attn.qkv", 3 * V, V)
        linear(s, f"{vit}blocks.{i}.attn.proj", V, V)
        norm(s, f"{vit}blocks.{i}.norm2", V)
        linear(s, f"{vit}blocks.{i}.mlp.fc1", 4 * V, V)
        linear(s, f"{vit}blocks.{i}.mlp.fc2", V, 4 * V)
    norm(s, f"{vit}norm", V)
    bert = "blip.text_encoder."
    s[f"{bert}embeddings.position_ids"] = torch.arange(POSITIONS).unsqueeze(0)
    s[f"{bert}embeddings.word_embeddings.weight"] = torch.randn(len(VOCAB) + 2, T, generator=generator)
    s[f"{bert}embeddings.position_embeddings.weight"] = torch.randn(POSITIONS, T, generator=generator) * 0.1
    norm(s, f"{bert}embeddings.LayerNorm", T)
    for i in range(LAYERS):
        layer = f"{bert}encoder.layer.{i}."
        for attention, source in (("attention", T), ("crossattention", V)):
            linear(s, f"{layer}{attention}.self.query", T, T)
            linear(s, f"{layer}{attention}.self.key", T, source)
            linear(s, f"{layer}{attention}.self.value", T, source)
            linear(s, f"{layer}{attention}.output.dense", T, T)
            norm(s, f"{layer}{attention}.output.LayerNorm", T)
        linear(s, f"{layer}intermediate.dense", 4 * T, T)
        linear(s, f"{layer}output.dense", T, 4 * T)
        norm(s, f"{layer}output.LayerNorm", T)
    linear(s, "blip.vision_proj", 8, V)  # BLIP's contrastive projections: saved, unused
    linear(s, "blip.text_proj", 8, T)
    for index, (out_features, in_features) in HEAD_SHAPES.items():
        linear(s, f"mlp.layers.{index}", out_features, in_features)
    return s


# --- BLIP's original forward (vit.py, med.py) in plain torch, on the original key layout ---


def _linear(x, s, name):
    return F.linear(x, s[f"{name}.weight"], s[f"{name}.bias"])


def _norm(x, s, name, eps):
    return F.layer_norm(x, x.shape[-1:], s[f"{name}.weight"], s[f"{name}.bias"], eps)


def _attention(q, k, v, mask=None):
    batch, length, width = q.shape

    def split(x):
        return x.view(batch, -1, HEADS, width // HEADS).transpose(1, 2)

    scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(width // HEADS)
    if mask is not None:  # med.py's extended mask: (1 - mask) * -10000
        scores = scores + (1.0 - mask[:, None, None, :].float()) * -10000.0
    return (scores.softmax(-1) @ split(v)).transpose(1, 2).reshape(batch, length, width)


def original_vit(s, pixels):
    p = "blip.visual_encoder."
    x = F.conv2d(pixels, s[f"{p}patch_embed.proj.weight"], s[f"{p}patch_embed.proj.bias"], stride=PATCH)
    x = torch.cat([s[f"{p}cls_token"].expand(len(x), -1, -1), x.flatten(2).transpose(1, 2)], dim=1)
    x = x + s[f"{p}pos_embed"]
    for i in range(LAYERS):
        b = f"{p}blocks.{i}."
        q, k, v = _linear(_norm(x, s, f"{b}norm1", 1e-6), s, f"{b}attn.qkv").chunk(3, dim=-1)
        x = x + _linear(_attention(q, k, v), s, f"{b}attn.proj")
        x = x + _linear(F.gelu(_linear(_norm(x, s, f"{b}norm2", 1e-6), s, f"{b}mlp.fc1")), s, f"{b}mlp.fc2")
    return _norm(x, s, f"{p}norm", 1e-6)


def original_text_encoder(s, input_ids, attention_mask, image_embeds):
    p = "blip.text_encoder."
    x = s[f"{p}embeddings.word_embeddings.weight"][input_ids]
    x = _norm(
        x + s[f"{p}embeddings.position_embeddings.weight"][: input_ids.shape[1]], s, f"{p}embeddings.LayerNorm", 1e-12
    )
    for i in range(LAYERS):
        b = f"{p}encoder.layer.{i}."
        for kind, source, mask in (("attention", x, attention_mask), ("crossattention", image_embeds, None)):
            q = _linear(x, s, f"{b}{kind}.self.query")
            k, v = _linear(source, s, f"{b}{kind}.self.key"), _linear(source, s, f"{b}{kind}.self.value")
            out = _linear(_attention(q, k, v, mask), s, f"{b}{kind}.output.dense")
            x = _norm(out + x, s, f"{b}{kind}.output.LayerNorm", 1e-12)
        hidden = _linear(F.gelu(_linear(x, s, f"{b}intermediate.dense")), s, f"{b}output.dense")
        x = _norm(hidden + x, s, f"{b}output.LayerNorm", 1e-12)
    return x


def original_image_reward(s, images, input_ids, attention_mask):
    """ImageReward.score_gard with torchvision's preprocessing (as in ImageReward's ReFL.py)."""
    images = TF.resize(images, 32, interpolation=InterpolationMode.BICUBIC, antialias=True)
    images = TF.center_crop(images, 32)
    pixels = TF.normalize(images, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
    features = original_text_encoder(s, input_ids, attention_mask, original_vit(s, pixels))[:, 0]
    for index in HEAD_SHAPES:  # the head has no activations (its ReLUs are commented out)
        features = _linear(features, s, f"mlp.layers.{index}")
    return (features[:, 0] - 0.16717362830052426) / 1.0333394966054072


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("image_reward")
    (folder / "bert").mkdir()
    (folder / "bert" / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    state = published_state()
    torch.save(state, folder / "ImageReward.pt")
    return str(folder / "ImageReward.pt"), str(folder / "bert"), state


@pytest.fixture(scope="module")
def reward(files):
    checkpoint, tokenizer_path, _ = files
    return ImageReward(checkpoint, tokenizer_path, TINY)


def test_reward_equals_the_original_computation(files, reward):
    _, tokenizer_path, state = files
    input_ids, attention_mask = reward.tokenize(PROMPTS)
    # bert-base-uncased conventions: [CLS] ... [SEP], lower case, WordPiece, padded with 0 to 35
    assert input_ids.shape == attention_mask.shape == (2, 35)
    assert input_ids[0, :8].tolist() == [2, 5, 6, 7, 8, 15, 3, 0]
    assert attention_mask[1].sum() == 8
    tokenizer = BertTokenizer.from_pretrained(tokenizer_path)
    assert reward.tokenizer.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [len(tokenizer), len(tokenizer) + 1]

    images = torch.rand(2, 3, 48, 72)  # resized to 32 x 48, then centre-cropped
    with torch.no_grad():
        scores = reward(images, PROMPTS)
        expected = original_image_reward(state, images, input_ids, attention_mask)
    assert scores.shape == (2,) and scores.dtype == torch.float32
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)
    assert (scores[0] - scores[1]).abs() > 1e-3  # the weights are not degenerate
    with torch.no_grad():  # the prompt matters: the text encoder is not bypassed
        assert not torch.allclose(reward(images, PROMPTS[::-1]), scores)


def test_transformers_modules_hold_the_published_weights(files, reward):
    _, _, state = files
    vision = reward.vision.state_dict()
    torch.testing.assert_close(
        vision["encoder.layers.1.self_attn.projection.weight"], state["blip.visual_encoder.blocks.1.attn.proj.weight"]
    )
    torch.testing.assert_close(vision["embeddings.class_embedding"], state["blip.visual_encoder.cls_token"])
    torch.testing.assert_close(vision["post_layernorm.bias"], state["blip.visual_encoder.norm.bias"])
    text = reward.text.state_dict()
    key = "encoder.layer.0.crossattention.self.value.weight"
    assert text[key].shape == (T, V)
    torch.testing.assert_close(text[key], state[f"blip.text_encoder.{key}"])
    assert isinstance(reward.vision, BlipVisionModel) and isinstance(reward.text, BlipTextModel)
    assert isinstance(reward.head, AestheticMLP)


def test_published_key_layout_maps_onto_transformers_blip():
    architecture = ImageRewardArchitecture()
    key_map = imagereward_key_map(architecture)
    with torch.device("meta"):
        modules = {
            "vision": BlipVisionModel(architecture.vision_config()),
            "text": BlipTextModel(architecture.text_config(), add_pooling_layer=False),
            "head": AestheticMLP(),
        }
    for part, module in modules.items():
        assert {key for p, key in key_map.values() if p == part} == set(module.state_dict())
    shapes = {original: tuple(modules[p].state_dict()[key].shape) for original, (p, key) in key_map.items()}
    assert shapes["blip.visual_encoder.pos_embed"] == (1, 197, 1024)  # ViT-L/16 at 224
    assert shapes["blip.visual_encoder.blocks.23.attn.qkv.weight"] == (3072, 1024)
    assert shapes["blip.text_encoder.embeddings.word_embeddings.weight"] == (30524, 768)
    assert shapes["blip.text_encoder.encoder.layer.11.crossattention.self.key.weight"] == (768, 1024)
    assert shapes["mlp.layers.0.weight"] == (1024, 768) and shapes["mlp.layers.7.weight"] == (1, 16)


def test_missing_unknown_and_misshapen_keys_are_clear_errors(files, tmp_path):
    _, tokenizer_path, state = files
    key = "blip.text_encoder.encoder.layer.1.crossattention.self.key.weight"
    broken = {k: v for k, v in state.items() if k != key}
    broken["blip.itm_head.weight"] = torch.zeros(2, T)
    torch.save(broken, tmp_path / "broken.pt")
    with pytest.raises(
        ValueError, match=r"1 missing, 1 unknown.*missing \[" + key + r"\], unknown \[blip.itm_head.weight\]"
    ):
        ImageReward(str(tmp_path / "broken.pt"), tokenizer_path, TINY)
    with pytest.raises(ValueError, match=r"2 missing.*blocks.2.attn.proj.*vision_layers=3"):
        ImageReward(files[0], tokenizer_path, ImageRewardArchitecture(**{**TINY.__dict__, "vision_layers": 3}))
    wider = ImageRewardArchitecture(**{**TINY.__dict__, "max_text_positions": 64})
    expected = (
        r"does not fit architecture.*1 tensors.*position_embeddings.weight \[40, 32\] \(architecture: \[64, 32\]\)"
    )
    with pytest.raises(ValueError, match=expected):
        ImageReward(files[0], tokenizer_path, wider)


def test_gradients_reach_the_images_and_the_judge_stays_frozen(reward):
    reward.train()
    assert not reward.training and not reward.text.training
    assert not any(p.requires_grad for p in reward.parameters())
    images = torch.rand(2, 3, 32, 32, requires_grad=True)
    reward(images, PROMPTS).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_non_finite_images_get_nan(reward):
    images = torch.rand(3, 3, 32, 32)
    images[1, 0, 4, 4] = float("nan")
    prompts = [*PROMPTS, "a dog"]
    with torch.no_grad():
        scores = reward(images, prompts)
        alone = reward(images[[0, 2]], [prompts[0], prompts[2]])
    assert scores.isnan().tolist() == [False, True, False]
    torch.testing.assert_close(scores[[0, 2]], alone)
    with pytest.raises(ValueError, match="3 images but 2 prompts"):
        reward(images, PROMPTS)


def test_missing_files_name_the_argument_and_the_fix(files, tmp_path):
    checkpoint, tokenizer_path, _ = files
    with pytest.raises(FileNotFoundError, match=r"checkpoint='.*nowhere.pt'.*THUDM/ImageReward.*local file path"):
        ImageReward(str(tmp_path / "nowhere.pt"), tokenizer_path, TINY)
    with pytest.raises(FileNotFoundError, match=r"tokenizer_path='.*no_bert'.*bert-base-uncased.*pass DIR"):
        ImageReward(checkpoint, str(tmp_path / "no_bert"), TINY)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"tokenizer_path='.*empty'.*vocab.txt"):
        ImageReward(checkpoint, str(tmp_path / "empty"), TINY)
