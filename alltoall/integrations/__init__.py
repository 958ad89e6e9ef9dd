"""Integrations with training frameworks, above every layer of the library.

Each framework has a module of its own that imports the framework only there,
so ``import alltoall`` never imports one:

- ``alltoall.integrations.megatron``: ``enable()`` adds the ``"alltoall"``
  backend to Megatron-Core's flex token dispatcher
  (``moe_flex_dispatcher_backend="alltoall"``), backed by
  ``alltoall.ExpertDispatcher``.
"""
