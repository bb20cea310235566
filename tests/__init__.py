"""CodeQuant's tests, laid out like src/codequant/.

* ``tests/<subpackage>/`` (adapters, calibration, core, evaluation, io, kernels, modules, quantizers,
  transforms, vllm): the tests of that subpackage of ``codequant``;
* ``tests/integration/``: the product as a whole (the CLI and its error handling, the quantize
  pipeline end to end, transformers integration, torch.compile, the build of the CPU extension);
* ``tests/vllm_serving/``: vLLM serving, run in its own venv (``make test-vllm``); skipped where
  vLLM is not installed;
* ``tests/helpers/``: what several test files share (not collected).

Every folder is a package (``__init__.py``), so test files in different folders may share a name
and import shared code as ``tests.helpers...``; pytest puts the repository root on ``sys.path``.
"""
