"""Models: names and shapes of parameters, loss decreasing on a tiny batch, evaluation, sampling."""
import numpy as np
import pytest

from asyncps.config import ModelConfig
from asyncps.worker.autodiff import SparseRows
from asyncps.worker.models import build_model
from asyncps.worker.step import GradientComputer

VOCAB = "abcdefgh "
META = {
    "linear": {"input_shape": (1,)},
    "softmax": {"input_shape": (784,), "num_classes": 10},
    "mlp": {"input_shape": (784,), "num_classes": 10},
    "cnn": {"input_shape": (28, 28, 1), "num_classes": 10},
    "charlm": {"input_shape": (4,), "num_classes": len(VOCAB), "vocab_size": len(VOCAB)},
}
CONFIGS = {
    "linear": ModelConfig(name="linear"),
    "softmax": ModelConfig(name="softmax"),
    "mlp": ModelConfig(name="mlp", hidden=[32, 32]),
    "cnn": ModelConfig(name="cnn", dropout=0.25),
    "charlm": ModelConfig(name="charlm", hidden=[32], context=4, embed_dim=8),
}
LEARNING_RATES = {"linear": 0.1, "softmax": 0.1, "mlp": 0.1, "cnn": 0.02, "charlm": 0.5}


def _batch(name, rng, n=16):
    if name == "linear":
        x = rng.standard_normal((n, 1)).astype(np.float32)
        return x, (2 * x[:, 0]).astype(np.float32)  # the articles' y = 2x
    if name == "charlm":
        return rng.integers(0, len(VOCAB), (n, 4)), rng.integers(0, len(VOCAB), n)
    return rng.random((n, *META[name]["input_shape"]), dtype=np.float32), rng.integers(0, 10, n)


def _dense(g):
    return g.to_dense() if isinstance(g, SparseRows) else g


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_loss_decreases_on_a_tiny_batch(name, rng):
    model = build_model(CONFIGS[name], META[name])
    params = model.init_params(rng)
    assert all(v.dtype == np.float32 for v in params.values())
    compute = GradientComputer(model, list(params), graph_mode=False)
    x, y = _batch(name, rng, 8 if name == "cnn" else 16)
    losses = []
    for _ in range(5):
        loss, grads = compute(params, x, y, rng)
        losses.append(loss)
        params = {k: v - LEARNING_RATES[name] * _dense(grads[k]) for k, v in params.items()}
    assert losses[-1] < losses[0], losses
    metrics = model.evaluate(params, x, y, batch_size=5)
    assert set(metrics) == ({"loss", "mse"} if name == "linear" else {"loss", "accuracy"})


def test_parameter_names_are_dotted_and_shaped():
    cnn = build_model(CONFIGS["cnn"], {"input_shape": (784,), "num_classes": 10})
    shapes = {k: v.shape for k, v in cnn.init_params(np.random.default_rng(0)).items()}
    assert shapes == {"conv1.kernel": (5, 5, 1, 32), "conv1.bias": (32,), "conv2.kernel": (5, 5, 32, 64),
                      "conv2.bias": (64,), "dense1.kernel": (3136, 1024), "dense1.bias": (1024,),
                      "dense2.kernel": (1024, 10), "dense2.bias": (10,)}
    mlp = build_model(ModelConfig(name="mlp", hidden=[256, 128]), META["mlp"])
    assert sorted(mlp.init_params(np.random.default_rng(0))) == [
        f"dense{i}.{p}" for i in (1, 2, 3) for p in ("bias", "kernel")]
    linear = build_model(CONFIGS["linear"], META["linear"]).init_params(np.random.default_rng(0))
    assert sorted(linear) == ["linear.b", "linear.w"]


def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(ValueError, match="model.name"):
        build_model(ModelConfig(name="resnet"), META["mlp"])


def test_charlm_samples_valid_characters_at_temperature_0_6(rng):
    model = build_model(CONFIGS["charlm"], META["charlm"])
    params = model.init_params(rng)
    text = model.sample(params, rng, prime="abc", length=20, temperature=0.6, vocab=VOCAB)
    assert len(text) == 20 and set(text) <= set(VOCAB)


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_charlm_rejects_non_positive_temperature(temperature, rng):
    model = build_model(CONFIGS["charlm"], META["charlm"])
    with pytest.raises(ValueError, match="temperature must be > 0"):
        model.sample(model.init_params(rng), rng, prime="ab", length=3, temperature=temperature, vocab=VOCAB)
