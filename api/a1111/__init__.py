"""The AUTOMATIC1111 web UI's API (``/sdapi/v1/...``, also served by Forge and SD.Next), on this server's engine.

Its rooms: ``schemas`` (the request and response shapes A1111's clients send and read), ``fields`` (what each
field that cannot apply here accepts: its neutral values, or a 400 naming it), ``mapping`` (an A1111 body made into
this server's ``GenerationRequest``s: the seeds, the sampler, ``<lora:name:weight>``), ``infotext`` (the ``info``
answer and A1111's parameters line), ``options`` (the server-wide options and the checkpoint list), ``progress``
(what ``/sdapi/v1/progress``, ``interrupt`` and ``skip`` read and act on) and ``run`` (a request's generations run
together). The routes are ``api.routes.a1111``; the page is docs/api/a1111.md.
"""
