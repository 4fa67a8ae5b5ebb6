// The Node.js half of benchmarks/gateway_sdk.sh, which starts nginx and weir-gateway and reads
// what this prints (one JSON line, or "ready" when a held load is in place).
//
//   node gateway_sdk.cjs load BASE_URL CONCURRENCY SECONDS
//       The official OpenAI SDK (default retries) sending whole chat completions from
//       CONCURRENCY workers for SECONDS: {"started", "ended" (epoch seconds), "ok", "failed"}.
//   node gateway_sdk.cjs idle HOST PORT N
//       N kept-alive connections, each after one GET /health; "ready", then held until stdin ends.
//   node gateway_sdk.cjs streams BASE_URL N
//       N streamed chat completions, each read until its first chunk; "ready", then held.
//   node gateway_sdk.cjs slow-upstream
//       An upstream whose streams send a chunk a second for ten minutes; prints its port.
'use strict';
const http = require('http');
const net = require('net');

const [mode, ...args] = process.argv.slice(2);
const messages = [{role: 'user', content: 'hello'}];

// Resolves when stdin ends: the script that started us holds the load until it has measured.
const heldUntilStdinEnds = () => new Promise((resolve) => {
  process.stdin.on('end', resolve).resume();
});

async function load(baseURL, concurrency, seconds) {
  const OpenAI = require('openai');
  const client = new OpenAI({apiKey: 'unused', baseURL});
  const started = Date.now() / 1000;
  const end = started + seconds;
  let ok = 0, failed = 0, firstFailure;
  const worker = async () => {
    while (Date.now() / 1000 < end) {
      try {
        await client.chat.completions.create({model: 'm', messages, max_tokens: 2});
        ++ok;
      } catch (e) {
        // A request still retrying when the run ends is cut, not failed.
        if (Date.now() / 1000 >= end) return;
        ++failed;
        firstFailure ??=
            e.status ? `${e.constructor.name} (${e.status})` : `${e.constructor.name}: ${e.message}`;
      }
    }
  };
  const workers = Array.from({length: concurrency}, worker);
  // Wait for the workers only until the end: one waiting out a retry would stretch the run.
  await Promise.race([Promise.all(workers), new Promise((r) => setTimeout(r, seconds * 1000))]);
  console.log(JSON.stringify({started, ended: Date.now() / 1000, ok, failed, firstFailure}));
  process.exit(0);
}

async function idle(host, port, n) {
  const request = `GET /health HTTP/1.1\r\nHost: ${host}\r\n\r\n`;
  const sockets = [];
  const open = () => new Promise((resolve, reject) => {
    const s = net.connect(port, host, () => s.write(request));
    s.once('data', () => resolve(s));  // the whole answer fits in one read
    s.once('error', reject);
    sockets.push(s);
  });
  for (let i = 0; i < n; i += 100)
    await Promise.all(Array.from({length: Math.min(100, n - i)}, open));
  console.log('ready');
  await heldUntilStdinEnds();
  for (const s of sockets) s.destroy();
}

async function streams(baseURL, n) {
  const url = new URL(`${baseURL}/chat/completions`);
  const agent = new http.Agent({keepAlive: true, maxSockets: Infinity});
  const body = JSON.stringify({model: 'm', messages, max_tokens: 1000, stream: true});
  const responses = [];
  const open = () => new Promise((resolve, reject) => {
    const req = http.request(url, {method: 'POST', agent, headers: {
      'content-type': 'application/json', 'content-length': Buffer.byteLength(body)}}, (res) => {
      if (res.statusCode !== 200) reject(new Error(`status ${res.statusCode}`));
      res.once('data', () => resolve(res));
      res.on('data', () => {});  // read on as the chunks come, as a client would
      responses.push(res);
    });
    req.on('error', reject);
    req.end(body);
  });
  await Promise.all(Array.from({length: n}, open));
  console.log('ready');
  await heldUntilStdinEnds();
  process.exit(0);
}

function slowUpstream() {
  const chunk = (delta, finish) => `data: ${JSON.stringify({id: 'chatcmpl-1',
    object: 'chat.completion.chunk', model: 'm',
    choices: [{index: 0, delta, finish_reason: finish}]})}\n\n`;
  const server = http.createServer((req, res) => {
    req.resume().on('end', () => {
      res.writeHead(200, {'content-type': 'text/event-stream', 'cache-control': 'no-cache'});
      res.write(chunk({role: 'assistant', content: ''}, null));
      let left = 600;
      const tick = setInterval(() => {
        if (--left > 0) return void res.write(chunk({content: 'ok '}, null));
        clearInterval(tick);
        res.end(`${chunk({}, 'stop')}data: [DONE]\n\n`);
      }, 1000);
      res.on('close', () => clearInterval(tick));
    });
  });
  server.maxConnections = Infinity;
  server.listen(0, '127.0.0.1', () => console.log(server.address().port));
}

const run = {
  load: () => load(args[0], Number(args[1]), Number(args[2])),
  idle: () => idle(args[0], Number(args[1]), Number(args[2])),
  streams: () => streams(args[0], Number(args[1])),
  'slow-upstream': slowUpstream,
}[mode];
if (!run) {
  console.error(`gateway_sdk.cjs: unknown mode '${mode}'`);
  process.exit(2);
}
Promise.resolve(run()).catch((e) => {
  console.error(`gateway_sdk.cjs: ${e.constructor.name}: ${e.message}`);
  process.exit(1);
});
