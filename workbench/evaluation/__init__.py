"""Zero-shot downstream evaluation of AR and masked-diffusion models (GitHub issue 4).

- :mod:`workbench.evaluation.tasks`: the 12 bundled task files, readers, fixed item subsets, tokenization with
  exact continuation boundaries, padded batches, metrics and the Composer evaluators used inside training.
- :mod:`workbench.evaluation.scoring`: the scorers (AR, Monte Carlo ELBO, chain rule, pseudo-log-likelihood,
  optional classifier-free guidance), pure functions of a network and token tensors.
- :mod:`workbench.evaluation.checkpoint`: load a trained run's model and tokenizer.
- :mod:`workbench.evaluation.cli` (``workbench eval``), :mod:`workbench.evaluation.generate`
  (``workbench generate``), :mod:`workbench.evaluation.bench` (scorer throughput).

Heavy imports live in the submodules, so importing this package is cheap.
"""
