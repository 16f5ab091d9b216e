"""How the stages run: block order (``blockwise``), streamed blocks (``offload``), ranks
(``distributed``), the on-disk stage cache (``cache``) and progress bars (``progress``)."""
