"""The stages, one module each with a `main(argv)`: rollouts, value, palette, policies, teach, distill, evaluate and
the pipeline that runs them in order. `recipes/*.py` are thin wrappers for `python` and `accelerate launch`."""
