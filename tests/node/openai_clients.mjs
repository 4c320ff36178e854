// The JavaScript OpenAI clients against hcx-server, unmodified: the official `openai` npm
// package (chat completions and the Responses API, plain and streamed) and the Vercel AI SDK,
// whose `openai(id)` model calls POST /v1/responses by default (`openai.chat(id)` calls chat).
//
// Usage: node openai_clients.mjs <base url, e.g. http://127.0.0.1:8000> <image file>
//
// Every call is seeded with min_tokens == max tokens (extensions the server accepts), so the
// Python test can check token counts and stream == non-stream. Prints ONE JSON summary on stdout;
// exits 1 with {"fatal": ...} when something threw.

import { readFileSync } from "node:fs";
import OpenAI from "openai";
import { generateText, streamText } from "ai";
import { createOpenAI } from "@ai-sdk/openai";

const N = 6;
const SEEDED = { seed: 11, min_tokens: N, temperature: 0.8 };
const [base, imageFile] = process.argv.slice(2);
if (!base || !imageFile) {
  console.error("usage: node openai_clients.mjs <base url> <image file>");
  process.exit(2);
}
const apiKey = process.env.HCX_TEST_API_KEY || "unused";
const image = readFileSync(imageFile);
const dataUrl = `data:image/png;base64,${image.toString("base64")}`;
const summary = { steps: [] };

async function openaiNpm() {
  const client = new OpenAI({ baseURL: `${base}/v1`, apiKey, maxRetries: 0 });
  const messages = [{ role: "user", content: [{ type: "text", text: "What is in this picture?" },
                                              { type: "image_url", image_url: { url: dataUrl } }] }];
  const chat = await client.chat.completions.create({ model: "any", messages, max_tokens: N, ...SEEDED });
  let streamed = "";
  let usage = null;
  const chunks = await client.chat.completions.create({ model: "any", messages, max_tokens: N, stream: true,
                                                        stream_options: { include_usage: true }, ...SEEDED });
  for await (const chunk of chunks) {
    streamed += chunk.choices[0]?.delta?.content ?? "";
    if (chunk.usage) usage = chunk.usage;
  }
  summary.chat = { text: chat.choices[0].message.content, streamed, tokens: chat.usage.completion_tokens,
                   streamedTokens: usage?.completion_tokens ?? null };
  summary.steps.push("openai chat");

  const input = [{ role: "user", content: [{ type: "input_text", text: "What is in this picture?" },
                                          { type: "input_image", image_url: dataUrl }] }];
  const response = await client.responses.create({ model: "any", input, max_output_tokens: N, ...SEEDED });
  const events = [];
  let deltas = "";
  const stream = await client.responses.create({ model: "any", input, max_output_tokens: N, stream: true, ...SEEDED });
  for await (const event of stream) {
    events.push(event.type);
    if (event.type === "response.output_text.delta") deltas += event.delta;
  }
  summary.responses = { text: response.output_text, status: response.status, tokens: response.usage.output_tokens,
                        streamed: deltas, lastEvent: events.at(-1), firstEvent: events[0] };
  summary.steps.push("openai responses");

  try {
    await client.responses.create({ model: "any", input: "x", store: true });
    summary.storeError = null;
  } catch (error) {
    summary.storeError = { status: error.status, param: error.param ?? null, name: error.constructor.name };
  }
  summary.steps.push("openai error");
}

async function vercelAiSdk() {
  // extensions travel as extra body fields (the AI SDK has no seed/min_tokens for the Responses
  // API); the wrapper also notes the input item types the SDK sent
  let seeded = true;
  let sentTypes = [];
  const fetchWithSeed = async (url, init) => {
    const body = JSON.parse(init.body);
    sentTypes = (body.input || []).map((item) => item.type || `message:${item.role}`);
    return fetch(url, { ...init, body: JSON.stringify(seeded ? { ...body, ...SEEDED } : body) });
  };
  const openai = createOpenAI({ baseURL: `${base}/v1`, apiKey, fetch: fetchWithSeed });
  const messages = [{ role: "user", content: [{ type: "text", text: "What is in this picture?" },
                                              { type: "file", data: image, mediaType: "image/png" }] }];
  const whole = await generateText({ model: openai("any"), messages, maxOutputTokens: N });
  const streamed = streamText({ model: openai("any"), messages, maxOutputTokens: N });
  let text = "";
  for await (const piece of streamed.textStream) text += piece;
  summary.aiSdkResponses = { text: whole.text, streamed: text, finishReason: whole.finishReason,
                             tokens: whole.usage.outputTokens, streamedTokens: (await streamed.usage).outputTokens,
                             responseId: whole.response?.id ?? null };
  summary.steps.push("ai-sdk responses");

  // a second turn, as a chat UI sends it: the SDK refers to the first answer by its item id
  seeded = false;
  const second = await generateText({ model: openai("any"), maxOutputTokens: 3,
                                      messages: [...messages, ...whole.response.messages,
                                                 { role: "user", content: "And now?" }] });
  summary.aiSdkSecondTurn = { text: second.text, tokens: second.usage.outputTokens, sentTypes };
  summary.steps.push("ai-sdk second turn");

  seeded = true;
  const chat = await generateText({ model: openai.chat("any"), messages, maxOutputTokens: N });
  summary.aiSdkChat = { text: chat.text, tokens: chat.usage.outputTokens };
  summary.steps.push("ai-sdk chat");
}

try {
  await openaiNpm();
  await vercelAiSdk();
  process.stdout.write(JSON.stringify(summary) + "\n");
  process.exit(0);
} catch (error) {
  summary.fatal = String(error && error.stack ? error.stack : error);
  process.stdout.write(JSON.stringify(summary) + "\n");
  process.exit(1);
}
