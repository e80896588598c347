"""The benchmarks, each a command that prints a header and a table and can write them as JSON.

* ``python -m stager bench`` (:mod:`~stager.benchmarks.staging`): this stager against PyTorch's
  stagers and the memcpy floor;
* ``python -m stager.benchmarks.replication``: replication against PyTorch's per-tensor transport;
* ``python -m stager.benchmarks.kernels``: the pack kernel against a device-to-device copy;
* ``python -m stager.benchmarks.torchtitan``: torchtitan's ``save()`` with and without this stager.

:mod:`~stager.benchmarks.common` holds what they share: the row's first fields, the percentile,
the header, the table and the JSON file.
"""
