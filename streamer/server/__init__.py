"""The server: adapters that speak to the outside world on top of the service layer.

``app`` (the Starlette routes and the uvicorn server), ``connection`` (one WebSocket: parse,
hand to the service, encode), ``protocol`` (every wire shape, in and out), ``outbox`` (a
socket's bounded queue and sender), ``previews`` (JPEGs encoded once per stream, rate and
width), ``metrics`` (Prometheus), ``security`` (Host, Origin, CORS), ``state`` (what the
handlers share) and ``runtime`` (streams, engine, loop and service wired together).

May import config, capture, the inference vocabulary and the service; ``runtime`` alone
starts the inference loop and engine (imported when started), so the adapters import no
torch.
"""
