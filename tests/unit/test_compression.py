"""Codecs and error feedback of compressed gossip (deca_ds.compression), against independent references.

References: a float64 restatement of the quantizer; the closed form of one CHOCO mixing step
``x_i + Σ_j W_ij (x̂_j - x̂_i)``; sums over time computed in float64.
"""

import math

import numpy as np
import pytest
import torch

from deca_ds.compression import FIRST_EXCHANGE_CODEC, GROUP_SIZE, ErrorFeedback, make_codec
from deca_ds.topology import make_topology

SIZES = [1, 2, 3, 255, 256, 257, 1000, 3 * GROUP_SIZE]


def _reference_quantize(x: torch.Tensor, bits: int, group: int = GROUP_SIZE) -> torch.Tensor:
    """Decoded values of symmetric per-group quantization, restated in float64 from the format's definition:
    scale = bf16(absmax / qmax), code = clamp(round_half_even(x / scale)), value = code * scale."""
    qmax = {8: 127, 4: 7}[bits]
    out = torch.empty(x.numel(), dtype=torch.float64)
    for a in range(0, x.numel(), group):
        g = x[a:a + group].double()
        scale = float(torch.tensor(float(g.abs().max()) / qmax, dtype=torch.float32).to(torch.bfloat16))
        codes = torch.zeros_like(g) if scale == 0 else torch.round(g.float() / np.float32(scale)).clamp(-qmax, qmax)
        out[a:a + group] = codes.double() * scale
    return out


@pytest.mark.parametrize("name,bits", [("int8", 8), ("int4", 4)])
@pytest.mark.parametrize("n", SIZES)
def test_integer_codecs_equal_the_reference_and_count_every_byte(name, bits, n):
    codec = make_codec(name)
    x = torch.randn(n, generator=torch.Generator().manual_seed(n)) * 3
    packet = codec.encode(x)
    groups = math.ceil(n / GROUP_SIZE)
    # 2-byte bf16 scale per group, then one byte per value (int8) or per two values (int4)
    assert packet.dtype == torch.uint8 and packet.numel() == codec.packet_bytes(n)
    assert codec.packet_bytes(n) == 2 * groups + (n if bits == 8 else (n + 1) // 2)
    decoded = codec.decode(packet, n)
    assert torch.equal(decoded.double(), _reference_quantize(x, bits))
    # and the rounding error is at most half a step (+ the bf16 rounding of the scale) per value
    for a in range(0, n, GROUP_SIZE):
        g = x[a:a + GROUP_SIZE]
        step = float(g.abs().max()) / {8: 127, 4: 7}[bits]
        assert float((decoded[a:a + GROUP_SIZE] - g).abs().max()) <= step * (0.5 + 2**-8) + 1e-7


def test_int4_packs_every_code_and_bf16_is_plain_rounding():
    codec = make_codec("int4")
    x = torch.arange(-7, 8, dtype=torch.float32)  # absmax 7 -> scale 1: the values are their codes; 15 values,
    assert torch.equal(codec.decode(codec.encode(x), 15), x)  # so the last byte is half padding
    y = torch.randn(513)
    bf = FIRST_EXCHANGE_CODEC
    assert bf.packet_bytes(513) == 2 * 513
    assert torch.equal(bf.decode(bf.encode(y), 513), y.to(torch.bfloat16).float())


def test_zero_groups_and_empty_inputs():
    for name in ("int8", "int4", "bf16"):
        codec = make_codec(name)
        z = torch.zeros(300)
        assert torch.equal(codec.decode(codec.encode(z), 300), z)
        assert codec.decode(codec.encode(torch.zeros(0)), 0).numel() == 0


@pytest.mark.parametrize("name", ["bf16", "int8", "int4"])
def test_cutting_at_group_multiples_encodes_identically(name):
    """The Mixer sends pieces cut at multiples of the group size, the simulator whole tensors: same bits."""
    codec = make_codec(name)
    x = torch.randn(5 * GROUP_SIZE + 77)
    whole = codec.decode(codec.encode(x), x.numel())
    cuts = [0, 2 * GROUP_SIZE, 3 * GROUP_SIZE, x.numel()]
    pieces = [codec.decode(codec.encode(x[a:b]), b - a) for a, b in zip(cuts, cuts[1:])]
    assert torch.equal(torch.cat(pieces), whole)
    assert sum(codec.packet_bytes(b - a) for a, b in zip(cuts, cuts[1:])) == codec.packet_bytes(x.numel())


@pytest.mark.parametrize("name", ["bf16", "int8", "int4"])
def test_error_feedback_reconstructs_the_sum_over_time(name):
    """What was sent, summed over time, equals what should have been sent minus one residual that never grows.

    A client's block changes by d_t each step (a drifting, noisy trajectory). "Should have been sent" up to step t is
    x_t - x_0 plus the start x_0 (the first exchange sends the block itself). The receiver rebuilds the sender's
    public copy from the packets alone, bit for bit; the residual x_t - x̂_t stays within half a quantization step of
    the last exchange (plus float32 accumulation), at every step, while sending the changes without feedback drifts.
    """
    gen = torch.Generator().manual_seed(0)
    n, steps = 1000, 60
    sender, receiver = ErrorFeedback(name), ErrorFeedback(name)
    x = torch.randn(n, generator=gen) * 0.02
    sent = torch.zeros(n, dtype=torch.float64)  # float64 sum of what was sent (decoded packets)
    no_feedback = torch.zeros(n, dtype=torch.float64)  # the changes sent without feedback, summed
    previous = torch.zeros(n)
    for t in range(steps):
        if t:
            x = x + 1e-4 * torch.randn(n, generator=gen) + 3e-5  # lr-sized steps with a drift
        codec = sender.begin(block_idx=3, numel=n)
        receiver.begin(block_idx=3, numel=n)
        assert codec is (FIRST_EXCHANGE_CODEC if t == 0 else make_codec(name))
        change = x.double() - sent  # what this exchange should carry: the change plus everything still owed
        packet = sender.encode(codec, x.clone(), 0)
        decoded = codec.decode(packet, n).double()
        sent += decoded
        no_feedback += codec.decode(codec.encode((x.double() - previous.double()).float()), n).double()
        previous = x.clone()
        # the receiver: one neighbour of weight 1, own weight 0 -> its neighbour sum is the sender's public copy
        receiver.mix_(codec, torch.zeros(n), 0, 0.0, [packet], [1.0])
        assert torch.equal(receiver.neighbour_sum, sender.public)
        sender.end()
        receiver.end()
        # Σ sent = Σ should have been sent (x_t, telescoped, exactly in float64) - residual, the residual one
        # quantization of `change`: <= half a step (+ the bf16 rounding of the scale; the bf16 codec rounds to half
        # an ulp, 2^-8 relative: half a "step" of absmax / 2^7), plus the float32 rounding of the sender's running
        # sum (t + 1 additions of values <= m) and of x - x̂.
        m = max(float(x.abs().max()), float(sender.public.abs().max()))
        step = float(change.abs().max()) / {"bf16": 2**7, "int8": 127, "int4": 7}[name]
        float32 = (t + 2) * 2**-24 * m
        residual = x.double() - sent
        assert float(residual.abs().max()) <= step * (0.5 + 2**-8) + float32, t
        assert float((sender.public.double() - sent).abs().max()) <= float32, t
    if name != "bf16":  # without feedback the errors of 60 exchanges add up
        assert float((x.double() - no_feedback).abs().max()) > 4 * float((x.double() - sent).abs().max())


def test_choco_step_equals_its_closed_form_preserves_the_mean_and_reaches_consensus():
    """Stacked clients on a ring, no local updates: one mixing step is x_i + Σ_j W_ij (x̂_j - x̂_i) (closed form,
    float64), the network sum is preserved, and repeated compressed gossip drives the clients to their mean."""
    n, numel = 6, 2 * GROUP_SIZE + 10
    topo = make_topology("ring", n)
    w = topo.weights
    gen = torch.Generator().manual_seed(1)
    x = [torch.randn(numel, generator=gen) for _ in range(n)]
    spread0 = float((torch.stack(x) - torch.stack(x).mean(0)).abs().max())
    mean = torch.stack(x).double().mean(0)
    fbs = [ErrorFeedback("int8") for _ in range(n)]
    for t in range(100):
        codecs = [fb.begin(0, numel) for fb in fbs]
        packets = [fb.encode(c, xi, 0) for fb, c, xi in zip(fbs, codecs, x)]
        publics = torch.stack([fb.public for fb in fbs]).double()
        expected = [x[i].double() + sum(w[i, j] * (publics[j] - publics[i]) for j in topo.neighbors(i))
                    for i in range(n)]
        m = max(float(torch.stack(x).abs().max()), float(publics.abs().max()))
        for i in range(n):
            nb = topo.neighbors(i)
            fbs[i].mix_(codecs[i], x[i], 0, w[i, i], [packets[j] for j in nb], [w[i, j] for j in nb])
            fbs[i].end()
        # float32: the neighbour sum is accumulated over t + 1 exchanges (2 additions each) against public copies
        # summed t + 1 times; then two more roundings for the update. Same bound for the network mean's step.
        bound = (3 * (t + 1) + 2) * 2**-24 * m
        for i in range(n):
            assert float((x[i].double() - expected[i]).abs().max()) <= bound, (t, i)
        new_mean = torch.stack(x).double().mean(0)
        assert float((new_mean - mean).abs().max()) <= bound, t
        mean = new_mean
    # Requirement, not a fit: compressed gossip must still reach consensus. Uncompressed, 100 steps shrink the
    # disagreement by (2/3)^100 (to float32 rounding); compressed gossip must shrink it at least 1000x.
    spread = float((torch.stack(x).double() - mean).abs().max())
    assert spread < spread0 / 1000, (spread, spread0)


def test_new_block_resets_and_state_round_trips():
    fb = ErrorFeedback("int4")
    x = torch.randn(300)
    c = fb.begin(1, 300)
    fb.encode(c, x, 0)
    fb.end()
    assert fb.begin(1, 300) is make_codec("int4")  # same visit: the integer codec
    state = fb.state_dict()
    other = ErrorFeedback("int4")
    other.load_state_dict(state)
    assert torch.equal(other.public, fb.public) and other.exchanges == 1 and other.block == 1
    assert other.begin(1, 300) is make_codec("int4")  # a resumed run continues the visit
    assert other.begin(2, 300) is FIRST_EXCHANGE_CODEC and not other.public.any()  # another block: fresh state
    with pytest.raises(ValueError, match="gossip.compression=int4 cannot be loaded with gossip.compression=int8"):
        ErrorFeedback("int8").load_state_dict(state)
    with pytest.raises(ValueError, match="gossip.compression='none' has no codec"):
        ErrorFeedback("none")
