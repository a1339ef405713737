import torch

from gpukv.tiers import codec as chunk_codec


def _payload(n=4096, seed=0):
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_round_trip_bit_exact():
    p = _payload()
    blob = chunk_codec.encode("m/0/ab", "fp1", p)
    out, reason = chunk_codec.decode(blob, "m/0/ab", "fp1", p.numel())
    assert reason == "" and torch.equal(out, p)


def test_every_mismatch_is_a_miss_with_a_reason():
    p = _payload()
    blob = chunk_codec.encode("m/0/ab", "fp1", p)
    assert chunk_codec.decode(blob, "m/0/other", "fp1", p.numel()) == (None, "key 'm/0/ab' != expected 'm/0/other'")
    assert chunk_codec.decode(blob, "m/0/ab", "fp2", p.numel())[1].startswith("layout fingerprint")
    assert chunk_codec.decode(blob, "m/0/ab", "fp1", p.numel() + 1)[1].startswith("size")
    assert chunk_codec.decode(blob[:-10], "m/0/ab", "fp1", p.numel())[0] is None
    assert chunk_codec.decode(b"", "m/0/ab", "fp1", p.numel())[0] is None
    flipped = bytearray(blob)
    flipped[-1] ^= 0xFF
    assert chunk_codec.decode(bytes(flipped), "m/0/ab", "fp1", p.numel())[1] == "checksum mismatch (corrupted value)"


def test_read_metadata_reads_only_the_header_and_refuses_malformed_ones():
    import io
    import struct

    import pytest

    p = _payload()
    blob = chunk_codec.encode("m/0/ab", "fp1", p)
    header_len = struct.unpack("<Q", blob[:8])[0]
    meta = chunk_codec.read_metadata(io.BytesIO(blob[: 8 + header_len]))  # no payload needed
    assert meta == chunk_codec.make_header("m/0/ab", "fp1", p)
    for bad, match in [(blob[:5], "truncated"), (blob[: 8 + header_len - 1], "truncated"),
                       (struct.pack("<Q", 1 << 40), "header of"),
                       (struct.pack("<Q", 2) + b"[]", "no metadata"),
                       (struct.pack("<Q", 3) + b"{x}", None)]:
        with pytest.raises(ValueError, match=match):
            chunk_codec.read_metadata(io.BytesIO(bad))
