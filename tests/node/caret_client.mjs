// Caret's MCP client path against hcx-server, with the SDK version Caret ships (1.11.1).
//
// Usage: node caret_client.mjs <mcp url> [image file]
//
// Caret (a Cline fork) builds the client the way Cline's McpHub does: a Client with empty
// capabilities, StreamableHTTPClientTransport(new URL(url), { requestInit: { headers } }),
// connect(), then `client.request({ method: "tools/list" }, ListToolsResultSchema)` and
// `client.request({ method: "tools/call", params: { name, arguments } }, CallToolResultSchema,
// { timeout })`, and close() at the end (no DELETE is sent). The convenience methods
// listTools()/callTool() are exercised too. One extra call asks for progress (Caret does not)
// so the SDK's own SSE parser reads the server's event stream.
//
// The same path also runs a current SDK: MCP_SDK=mcp-sdk-current (an npm alias of
// @modelcontextprotocol/sdk 1.32, installed beside Caret's 1.11.1 in package.json).
//
// Prints ONE JSON object on stdout (the summary); exits 0 when the script ran to the end,
// 1 with {"fatal": ...} when something threw. The Python test asserts on the summary.

import { readFileSync } from "node:fs";

const SDK = process.env.MCP_SDK || "@modelcontextprotocol/sdk";
const { Client } = await import(`${SDK}/client/index.js`);
const { StreamableHTTPClientTransport } = await import(`${SDK}/client/streamableHttp.js`);
const { CallToolResultSchema, ListToolsResultSchema, LATEST_PROTOCOL_VERSION } = await import(`${SDK}/types.js`);

const TOOL = "generate_hyperclovax_vision";
const TIMEOUT_MS = 120_000;

const [url, imageFile] = process.argv.slice(2);
if (!url) {
  console.error("usage: node caret_client.mjs <mcp url> [image file]");
  process.exit(2);
}

const summary = { sdkLatestProtocolVersion: LATEST_PROTOCOL_VERSION, transportErrors: [], steps: [] };

function textOf(result) {
  return (result.content || []).filter((c) => c.type === "text").map((c) => c.text).join("");
}

function shape(result) {
  return { isError: result.isError === true, contentTypes: (result.content || []).map((c) => c.type), text: textOf(result) };
}

async function main() {
  const client = new Client({ name: "Caret", version: "3.0.0" }, { capabilities: {} });
  const transport = new StreamableHTTPClientTransport(new URL(url), {
    requestInit: { headers: { "User-Agent": "caret-mcp-test" } },
  });
  // Caret logs transport errors; any here (e.g. from the GET /mcp probe) is a failure for the test.
  transport.onerror = (error) => summary.transportErrors.push(String(error && error.message ? error.message : error));

  await client.connect(transport);
  summary.steps.push("connect");
  summary.sessionId = transport.sessionId ?? null;
  summary.serverVersion = client.getServerVersion() ?? null;
  summary.serverCapabilities = client.getServerCapabilities() ?? null;
  summary.instructions = client.getInstructions?.() ?? null;

  // Caret's McpHub.fetchToolsList
  const listed = await client.request({ method: "tools/list" }, ListToolsResultSchema, { timeout: TIMEOUT_MS });
  summary.tools = listed.tools.map((t) => ({ name: t.name, inputSchema: t.inputSchema }));
  summary.steps.push("tools/list");
  // ... and the convenience method
  summary.toolsViaListTools = (await client.listTools()).tools.map((t) => t.name);

  // Caret's McpHub.callTool: text only
  const text = await client.request(
    { method: "tools/call", params: { name: TOOL, arguments: { prompt: "Say hello.", max_tokens: 8, min_tokens: 8 } } },
    CallToolResultSchema,
    { timeout: TIMEOUT_MS },
  );
  summary.textCall = shape(text);
  summary.steps.push("tools/call text");

  if (imageFile) {
    const b64 = readFileSync(imageFile).toString("base64");
    const image = await client.request(
      { method: "tools/call", params: { name: TOOL, arguments: { prompt: "Describe this image.", image_base64: b64, max_tokens: 8 } } },
      CallToolResultSchema,
      { timeout: TIMEOUT_MS },
    );
    summary.imageCall = shape(image);
    const dataUrl = await client.callTool({
      name: TOOL,
      arguments: { prompt: "Describe this image.", image_base64: `data:image/png;base64,${b64}`, max_tokens: 4 },
    });
    summary.dataUrlImageCall = shape(dataUrl);
    summary.steps.push("tools/call image");
  }

  // A tool failure must be a result with isError, not a thrown HTTP error.
  const bad = await client.callTool({ name: TOOL, arguments: { prompt: "Describe this image.", image_base64: "bm90IGFuIGltYWdl" } });
  summary.badImageCall = shape(bad);
  summary.steps.push("tools/call bad image");

  // An unknown tool is a JSON-RPC error (McpError with the server's code), not an HTTP error.
  try {
    await client.callTool({ name: "no_such_tool", arguments: {} });
    summary.unknownTool = { threw: false };
  } catch (error) {
    summary.unknownTool = { threw: true, code: error.code ?? null, message: String(error.message) };
  }
  summary.steps.push("tools/call unknown tool");

  // Not something Caret does: progress makes the server answer with SSE, parsed by the SDK.
  const progress = [];
  const streamed = await client.request(
    { method: "tools/call", params: { name: TOOL, arguments: { prompt: "Count.", max_tokens: 8, min_tokens: 8, seed: 1 } } },
    CallToolResultSchema,
    { timeout: TIMEOUT_MS, onprogress: (p) => progress.push(p) },
  );
  summary.progressCall = { ...shape(streamed), progress };
  summary.steps.push("tools/call with progress");

  await client.ping();
  summary.steps.push("ping");

  await client.close();
  summary.steps.push("close");
}

try {
  await main();
  process.stdout.write(JSON.stringify(summary) + "\n");
  process.exit(0);
} catch (error) {
  summary.fatal = String(error && error.stack ? error.stack : error);
  process.stdout.write(JSON.stringify(summary) + "\n");
  process.exit(1);
}
