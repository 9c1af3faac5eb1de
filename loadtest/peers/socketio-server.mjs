// A peer for `fanout --target socketio`: socket.io 4 on the Redis adapter (@socket.io/redis-adapter
// with node-redis, as socket.io's docs set it up for more than one node), broadcasting with
// `io.to(room).emit`, over the WebSocket transport only. REDIS_SOCKET is the unix socket of the
// private redis-server the generator starts.
// Events: subscribe -> subscribed {offset}; publish {seq, data} -> message {offset, data} to the
// room, with a gapless offset, and ack. No auth, no history, no bound on a slow subscriber.
import { createServer } from 'node:http';
import { createAdapter } from '@socket.io/redis-adapter';
import { createClient } from 'redis';
import { Server } from 'socket.io';

const path = process.env.REDIS_SOCKET;
if (!path) {
  console.error('REDIS_SOCKET must name the redis-server unix socket');
  process.exit(2);
}
const pub = createClient({ socket: { path } });
const sub = pub.duplicate();
// As the adapter's docs do: a connection error is logged, not thrown.
for (const client of [pub, sub]) client.on('error', (err) => console.error('redis:', err.message));
await Promise.all([pub.connect(), sub.connect()]);

const http = createServer();
const io = new Server(http, {
  adapter: createAdapter(pub, sub),
  transports: ['websocket'],
  serveClient: false,
});
let offset = 0;
io.on('connection', (socket) => {
  socket.on('subscribe', () => {
    socket.join('fleet');
    socket.emit('subscribed', { channel: 'fleet', offset });
  });
  socket.on('publish', (msg) => {
    offset += 1;
    io.to('fleet').emit('message', { channel: 'fleet', offset, data: msg?.data });
    socket.emit('ack', { seq: msg?.seq, offset });
  });
});
http.listen(0, '127.0.0.1', () => {
  console.error(`socket.io peer listening addr=127.0.0.1:${http.address().port}`);
});
