"""A peer for `fanout --target python-websockets`: Python with the `websockets` package and its
`broadcast()` helper, as its docs recommend for fan-out (the message encoded once, written to
every subscriber without waiting). Speaks just enough of the hub's protocol for the generator:
hello; subscribe -> subscribed; publish -> message to every subscriber, with a gapless offset,
and ack. No auth, no history, no bound on what a slow subscriber buffers (broadcast's default).
"""

import asyncio
import json
import sys

from websockets.asyncio.server import broadcast, serve

subscribers = set()
offset = 0


def encode(message):
    """Compact JSON, as the hub writes it (and as the generator reads it)."""
    return json.dumps(message, separators=(",", ":"))


async def handler(socket):
    global offset
    await socket.send('{"type":"hello","hub":"python-websockets"}')
    try:
        async for text in socket:
            try:
                msg = json.loads(text)
            except ValueError:
                await socket.close(1007, "not JSON")
                return
            if msg.get("type") == "subscribe":
                subscribers.add(socket)
                await socket.send(encode({"type": "subscribed", "channel": "fleet", "offset": offset}))
            elif msg.get("type") == "publish":
                offset += 1
                message = encode(
                    {"type": "message", "channel": "fleet", "offset": offset, "data": msg.get("data")}
                )
                broadcast(subscribers, message)
                await socket.send(encode({"type": "ack", "seq": msg.get("seq"), "offset": offset}))
    finally:
        subscribers.discard(socket)


async def main():
    async with serve(handler, "127.0.0.1", 0, compression=None, max_size=1 << 16) as server:
        port = server.sockets[0].getsockname()[1]
        print(f"python websockets peer listening addr=127.0.0.1:{port}", file=sys.stderr, flush=True)
        await asyncio.get_running_loop().create_future()


if __name__ == "__main__":
    asyncio.run(main())
