// A peer for `fanout --target node-ws`: Node.js with the `ws` package, broadcasting the way its
// README does (every open subscriber gets `send` of the same data), the publication encoded once.
// Speaks just enough of the hub's protocol for the generator: hello; subscribe -> subscribed;
// publish -> message to every subscriber, with a gapless offset, and ack. No auth, no history,
// and no bound on what a slow subscriber buffers (the package's default).
import { WebSocket, WebSocketServer } from 'ws';

const subscribers = new Set();
let offset = 0;

const server = new WebSocketServer({ host: '127.0.0.1', port: 0, clientTracking: false });
server.on('listening', () => {
  console.error(`node ws peer listening addr=127.0.0.1:${server.address().port}`);
});
server.on('connection', (socket) => {
  socket.send('{"type":"hello","hub":"node-ws"}');
  socket.on('message', (data) => {
    let msg;
    try {
      msg = JSON.parse(data);
    } catch {
      socket.close(1007, 'not JSON');
      return;
    }
    if (msg.type === 'subscribe') {
      subscribers.add(socket);
      socket.send(JSON.stringify({ type: 'subscribed', channel: 'fleet', offset }));
    } else if (msg.type === 'publish') {
      offset += 1;
      const message = Buffer.from(
        JSON.stringify({ type: 'message', channel: 'fleet', offset, data: msg.data }),
      );
      for (const subscriber of subscribers) {
        if (subscriber.readyState === WebSocket.OPEN) subscriber.send(message, { binary: false });
      }
      socket.send(JSON.stringify({ type: 'ack', seq: msg.seq, offset }));
    }
  });
  socket.on('close', () => subscribers.delete(socket));
});
