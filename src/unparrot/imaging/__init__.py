"""Image operations that every stage shares: decoding untrusted bytes (`decode`), filling text boxes
(`mask`, T-MARS) and drawing words (`typography`). Part of the ground floor with `io`: it imports no stage,
so synth, evaluate, curate (reshard) and train all stand on the same code (tests/test_imaging.py checks)."""
