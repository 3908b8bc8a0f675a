"""Peer 1: a plain per-request FastAPI endpoint. Each request runs the engine on its own, off the event loop."""

from __future__ import annotations

from fastapi import FastAPI, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from benchmarks import oip
from benchmarks.peers.common import load_engine, metadata, parse_args


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
            header, inputs = oip.decode_request(await request.body(),
                                                request.headers.get(oip.HEADER_LENGTH))
            outputs = await run_in_threadpool(engine.infer, inputs)
        except ValueError as exc:  # ProtocolError, InputError
            return JSONResponse({"error": str(exc)}, status_code=400)
        body, headers = oip.encode_response(model, outputs, binary=oip.wants_binary(header))
        return Response(body, headers=headers)

    return app


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    args = parse_args(__doc__.splitlines()[0], argv)
    app = create_app(args.onnx, args.model, args.threads)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
