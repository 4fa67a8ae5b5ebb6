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
//   node gateway_sdk.cjs upstream [INTERVAL_MS CHUNKS]
//       An upstream in both dialects, whole and streamed (CHUNKS chunks INTERVAL_MS apart;
//       5 and 4 by default); prints its port.
//   node gateway_sdk.cjs check GATEWAY_URL SECONDS
//       Both official SDKs through the gateway for SECONDS, whole and streamed, as two tenants
//       (keys in $KEY_A and $KEY_B): {"started", "ended", "a": {...}, "b": {...}}.
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

// Tenant A: four OpenAI and two Anthropic workers, every other request streamed, default
// retries; none may fail. Tenant B: two OpenAI workers without retries, whose refusals by the
// gateway (its tenant limit) are counted apart from failures.
async function check(gatewayURL, seconds) {
  const OpenAI = require('openai');
  const Anthropic = require('@anthropic-ai/sdk');
  const started = Date.now() / 1000;
  const end = started + seconds;
  const tally = () => ({ok: 0, streamed: 0, limited: 0, failed: 0});
  const a = tally(), b = tally();
  const fail = (t, e) => {
    ++t.failed;
    t.firstFailure ??=
        e.status ? `${e.constructor.name} (${e.status})` : `${e.constructor.name}: ${e.message}`;
  };
  const openai = new OpenAI({apiKey: process.env.KEY_A, baseURL: `${gatewayURL}/v1`});
  const claude = new Anthropic({apiKey: process.env.KEY_A, baseURL: gatewayURL});
  const openaiB = new OpenAI({apiKey: process.env.KEY_B, baseURL: `${gatewayURL}/v1`,
                              maxRetries: 0});
  const chat = (stream) => ({model: 'gpt-mini', messages, max_tokens: 8, stream});
  const message = {model: 'claude-haiku', max_tokens: 8, messages};
  const calls = {
    openaiWhole: async () => (await openai.chat.completions.create(chat(false)))
                                 .choices[0].message.content === 'ok',
    openaiStreamed: async () => {
      let text = '', finish;
      for await (const c of await openai.chat.completions.create(chat(true))) {
        text += c.choices[0]?.delta?.content ?? '';
        finish ??= c.choices[0]?.finish_reason;
      }
      return text.startsWith('ok ') && finish === 'stop';
    },
    claudeWhole: async () => (await claude.messages.create(message)).content[0].text === 'ok',
    claudeStreamed: async () => {
      let text = '';
      const events = claude.messages.stream(message);
      events.on('text', (t) => { text += t; });
      const final = await events.finalMessage();
      return text.startsWith('ok ') && final.stop_reason === 'end_turn';
    },
    tenantB: async () => (await openaiB.chat.completions.create(chat(false)))
                             .choices[0].message.content === 'ok',
  };
  const worker = async (t, kinds) => {
    for (let n = 0; Date.now() / 1000 < end; ++n) {
      const kind = kinds[n % kinds.length];
      try {
        if (!(await calls[kind]())) fail(t, new Error(`${kind}: a wrong answer`));
        else if (kind.endsWith('Streamed')) ++t.streamed;
        else ++t.ok;
      } catch (e) {
        if (t === b && e.status === 429) {
          ++t.limited;
          await new Promise((r) => setTimeout(r, 200));  // as a client that was told to wait
        } else {
          fail(t, e);
        }
      }
    }
  };
  const workers = [
    ...Array.from({length: 4}, () => worker(a, ['openaiWhole', 'openaiStreamed'])),
    ...Array.from({length: 2}, () => worker(a, ['claudeStreamed', 'claudeWhole'])),
    ...Array.from({length: 2}, () => worker(b, ['tenantB'])),
  ];
  await Promise.all(workers);
  console.log(JSON.stringify({started, ended: Date.now() / 1000, a, b}));
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

// An upstream in both dialects: whole answers at once, streams of CHUNKS text chunks
// INTERVAL_MS apart (the memory measure holds streams open with a chunk a second).
function upstream(intervalMs, chunks) {
  const openaiChunk = (delta, finish, usage = null) => `data: ${JSON.stringify({id: 'chatcmpl-1',
    object: 'chat.completion.chunk', model: 'm', choices: usage ? [] : [{index: 0, delta,
    finish_reason: finish}], usage})}\n\n`;
  const event = (type, fields) => `event: ${type}\ndata: ${JSON.stringify({type, ...fields})}\n\n`;
  const anthropicText = event('content_block_delta',
      {index: 0, delta: {type: 'text_delta', text: 'ok '}});
  const server = http.createServer((req, res) => {
    let body = '';
    req.on('data', (d) => { body += d; }).on('end', () => {
      let asked = {};
      try { asked = JSON.parse(body); } catch {}
      const anthropic = req.url.endsWith('/messages');
      if (!asked.stream) {
        res.writeHead(200, {'content-type': 'application/json'});
        return void res.end(JSON.stringify(anthropic ?
            {id: 'msg_1', type: 'message', role: 'assistant', model: 'm',
             content: [{type: 'text', text: 'ok'}], stop_reason: 'end_turn',
             usage: {input_tokens: 12, output_tokens: 2}} :
            {id: 'r', object: 'chat.completion', model: 'm', choices: [{index: 0,
             message: {role: 'assistant', content: 'ok'}, finish_reason: 'stop'}],
             usage: {prompt_tokens: 12, completion_tokens: 2, total_tokens: 14}}));
      }
      res.writeHead(200, {'content-type': 'text/event-stream', 'cache-control': 'no-cache'});
      res.write(anthropic ?
          event('message_start', {message: {id: 'msg_1', type: 'message', role: 'assistant',
            model: 'm', content: [], usage: {input_tokens: 12, output_tokens: 1}}}) +
          event('content_block_start', {index: 0, content_block: {type: 'text', text: ''}}) :
          openaiChunk({role: 'assistant', content: ''}, null));
      let left = chunks;
      const tick = setInterval(() => {
        if (left-- > 0) return void res.write(anthropic ? anthropicText :
                                                          openaiChunk({content: 'ok '}, null));
        clearInterval(tick);
        res.end(anthropic ?
            event('content_block_stop', {index: 0}) +
            event('message_delta', {delta: {stop_reason: 'end_turn'},
                                    usage: {output_tokens: chunks}}) +
            event('message_stop', {}) :
            openaiChunk({}, 'stop') +
            openaiChunk(null, null, {prompt_tokens: 12, completion_tokens: chunks,
                                     total_tokens: 12 + chunks}) + 'data: [DONE]\n\n');
      }, intervalMs);
      res.on('close', () => clearInterval(tick));
    });
  });
  server.maxConnections = Infinity;
  server.keepAliveTimeout = 60000;
  server.listen(0, '127.0.0.1', () => console.log(server.address().port));
}

const run = {
  load: () => load(args[0], Number(args[1]), Number(args[2])),
  idle: () => idle(args[0], Number(args[1]), Number(args[2])),
  streams: () => streams(args[0], Number(args[1])),
  upstream: () => upstream(Number(args[0] ?? 5), Number(args[1] ?? 4)),
  check: () => check(args[0], Number(args[1])),
}[mode];
if (!run) {
  console.error(`gateway_sdk.cjs: unknown mode '${mode}'`);
  process.exit(2);
}
Promise.resolve(run()).catch((e) => {
  console.error(`gateway_sdk.cjs: ${e.constructor.name}: ${e.message}`);
  process.exit(1);
});
