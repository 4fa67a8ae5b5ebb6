// The official OpenAI and Anthropic Node SDKs against weir-gateway, unchanged but for their base
// URL and key: whole and streamed in both dialects, two tenants with different limits, a budget,
// a key the gateway does not know and a model it does not have. Run by tests/gateway_test.cpp
// (the "[sdk]" test), which starts the gateway and reads this script's exit status.
//
//   GATEWAY_URL=http://127.0.0.1:PORT KEY_A=... KEY_B=... KEY_C=... node sdk_client.cjs
'use strict';
const OpenAI = require('openai');
const Anthropic = require('@anthropic-ai/sdk');

const url = process.env.GATEWAY_URL;
const failures = [];
const check = (ok, what) => {
  if (!ok) failures.push(what);
};
const statusOf = async (call) => {
  try {
    await call();
    return 200;
  } catch (e) {
    return e.status ?? `no status (${e.constructor.name})`;
  }
};

const openai = (key, options = {}) => new OpenAI({apiKey: key, baseURL: `${url}/v1`, ...options});
const anthropic = (key, options = {}) =>
  new Anthropic({apiKey: key, baseURL: url, ...options});

async function main() {
  const a = openai(process.env.KEY_A);
  const whole = await a.chat.completions.create(
      {model: 'gpt-mini', messages: [{role: 'user', content: 'hello'}], max_tokens: 16});
  check(whole.choices[0].message.content === 'ok', 'openai whole: content');
  check(whole.usage.completion_tokens > 0, 'openai whole: usage');

  let streamed = '';
  const stream = await a.chat.completions.create(
      {model: 'gpt-mini', messages: [{role: 'user', content: 'hello'}], max_tokens: 16,
       stream: true});
  for await (const chunk of stream) streamed += chunk.choices[0]?.delta?.content ?? '';
  check(streamed.startsWith('ok '), 'openai streamed: content');

  const models = [];
  for await (const m of a.models.list()) models.push(m.id);
  check(models.includes('gpt-mini') && models.includes('claude-haiku'), 'openai models.list');

  const claude = anthropic(process.env.KEY_A);
  const message = await claude.messages.create(
      {model: 'claude-haiku', max_tokens: 16, messages: [{role: 'user', content: 'hello'}]});
  check(message.content[0].text === 'ok', 'anthropic whole: content');
  check(message.usage.output_tokens > 0, 'anthropic whole: usage');

  let text = '';
  const events = claude.messages.stream(
      {model: 'claude-haiku', max_tokens: 16, messages: [{role: 'user', content: 'hello'}]});
  events.on('text', (t) => { text += t; });
  const final = await events.finalMessage();
  check(text.startsWith('ok ') && final.stop_reason === 'end_turn', 'anthropic streamed');

  // Errors as the SDKs know them, without retries that would only hide them.
  const once = {maxRetries: 0};
  check(await statusOf(() => openai('sk-unknown', once).chat.completions.create(
            {model: 'gpt-mini', messages: [{role: 'user', content: 'hi'}]})) === 401,
        'openai: an unknown key is 401');
  check(await statusOf(() => anthropic('sk-unknown', once).messages.create(
            {model: 'claude-haiku', max_tokens: 8, messages: [{role: 'user', content: 'hi'}]})) ===
            401,
        'anthropic: an unknown key is 401');
  check(await statusOf(() => a.chat.completions.create(
            {model: 'gpt-9000', messages: [{role: 'user', content: 'hi'}]})) === 404,
        'openai: an unknown model is 404');
  check(await statusOf(() => claude.messages.create(
            {model: 'gpt-9000', max_tokens: 8, messages: [{role: 'user', content: 'hi'}]})) === 404,
        'anthropic: an unknown model is 404');

  // Tenant B may send one request a minute: its second is refused, tenant A's are not.
  const b = openai(process.env.KEY_B, once);
  const ask = (client) => () => client.chat.completions.create(
      {model: 'gpt-mini', messages: [{role: 'user', content: 'hi'}], max_tokens: 8});
  check(await statusOf(ask(b)) === 200, 'tenant B: first request');
  check(await statusOf(ask(b)) === 429, 'tenant B: second request refused by its limit');
  check(await statusOf(ask(a)) === 200, 'tenant A: not held back by tenant B');
  // Tenant C's budget is below one request: 429 with x-should-retry: false, which the SDK obeys
  // (default retries on).
  const started = Date.now();
  check(await statusOf(ask(openai(process.env.KEY_C))) === 429, 'tenant C: over its budget');
  check(Date.now() - started < 5000, 'tenant C: the SDK did not retry a spent budget');

  console.log(JSON.stringify({failures}));
  process.exit(failures.length === 0 ? 0 : 1);
}

main().catch((e) => {
  console.error(`sdk_client: ${e.constructor.name}: ${e.message}`);
  process.exit(1);
});
