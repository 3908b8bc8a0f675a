"""Peer 1: a plain per-request FastAPI endpoint. Each request runs the engine on its own, off the event loop."""

from __future__ import annotations

from fastapi import FastAPI, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from benchmarks.peers.common import load_engine, metadata, parse_args
from oip.codec import HEADER_LENGTH, decode_request, encode_outputs
from oip.parameters import flag


def create_app(onnx: str, model: str, threads: int | None) -> FastAPI:
    app = FastAPI()
    engine = load_engine(onnx, threads)

    @app.get("/v2/health/ready")
    def ready() -> dict:
        return {"ready": True}

    @app.get(f"/v2/models/{model}")
    def model_metadata() -> dict:
        return metadata(model, engine)

    @app.post(f"/v2/models/{model}/infer")
    async def infer(request: Request) -> Response:
        try:
            # the server's own strict decoder, so every server under test refuses the same bodies
            req, inputs = decode_request(await request.body(), request.headers.get(HEADER_LENGTH))
            binary = flag(req.parameters, "binary_data_output", False, "parameters.binary_data_output")
            outputs = await run_in_threadpool(engine.infer, inputs)
        except ValueError as exc:  # ProtocolError, SchemaError, InputError
            return JSONResponse({"error": str(exc)}, status_code=400)
        body, headers = encode_outputs(model, outputs, binary=binary)
        return Response(body, headers=headers)

    return app


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    args = parse_args(__doc__.splitlines()[0], argv)
    app = create_app(args.onnx, args.model, args.threads)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
