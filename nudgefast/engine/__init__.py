"""The host side of decoding: requests, the scheduler (who runs, on which pages), the engine loop
(add_request / step / abort) and its asyncio front. No kernels here; the device work is runner/."""
