"""benchmarks/sharding_memory.py measures what each rank holds (one sharded 2-process run here)."""

from benchmarks.sharding_memory import CONFIGS, measure


def test_the_footprint_of_a_sharded_run_is_half_of_the_denoiser_and_its_optimiser_state(tmp_path):
    ranks = measure(CONFIGS["sd3"], True, "fsdp2", "cpu", tmp_path)
    for record in ranks:
        whole = record["denoiser_parameters"] * 4  # float32
        assert 0.45 * whole <= record["denoiser_bytes"] <= 0.55 * whole
        assert record["trainable_bytes"] == record["denoiser_bytes"]  # full fine-tuning: all of it trains
        assert 0.45 * 2 * whole <= record["optimizer_bytes"] <= 0.55 * 2 * whole  # AdamW: two moments
    assert {r["rank"] for r in ranks} == {0, 1}
