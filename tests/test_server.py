"""The OpenAI-compatible endpoint (`infer.py --serve`), served in-process on a free port with the tiny random
Qwen2-VL: the official openai client end to end (plain chat, two-step with its `focus`, n, text-only; greedy
replies equal in-process generation), and every rejection answered with its status and an OpenAI-style JSON
error, without hanging, without fetching anything remote, and without reading files outside --image_dir."""
import base64
import http.client
import io
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from http.server import ThreadingHTTPServer
from types import SimpleNamespace

import openai
import pytest
from PIL import Image

import common
import infer

NAME = "qwen2-vl"  # the served name: the model directory's name
TWO_STEP = NAME + "-two-step"
ZOOM = NAME + "-zoom"
QUESTION = "What shape is the red object?"
IMAGE = "images/train_00000.png"  # relative to --image_dir (the toy data directory)
MAX_TOKENS = 8  # the model is random: a few tokens show the structure as well as many would
MAX_IMAGE_PIXELS = 400 * 300  # the server's cap in these tests: the toy's 224 x 168 images are under it
MAX_REQUEST_PIXELS = 3 * MAX_IMAGE_PIXELS  # a request's images together: three at the per-image cap
MAX_IMAGES = 8


def start(model, processor, args):
    """An in-process server on a free port, as `serve` builds it; returns (httpd, thread)."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), infer.make_handler(infer.Server(model, processor, args)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    return httpd, thread


@pytest.fixture(scope="module")
def srv(toy):
    path = str(toy / NAME)
    model, processor = common.load_model(path).eval(), common.load_processor(path)
    args = infer.parse_args(["--serve", "--model", path, "--port", "0", "--image_dir", str(toy / "data"),
                             "--max_body_mb", "0.5", "--read_timeout", "3",
                             "--max_image_pixels", str(MAX_IMAGE_PIXELS), "--max_request_pixels",
                             str(MAX_REQUEST_PIXELS), "--max_images", str(MAX_IMAGES)])
    httpd, thread = start(model, processor, args)
    with open(toy / "data" / IMAGE, "rb") as f:
        png = f.read()
    yield SimpleNamespace(port=httpd.server_address[1], model=model, processor=processor, toy=toy, args=args,
                          image_url="data:image/png;base64," + base64.b64encode(png).decode(),
                          image=Image.open(toy / "data" / IMAGE).convert("RGB"))
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def client(srv):
    # No retries: an error must surface as the server sent it, not be retried into a timeout.
    with openai.OpenAI(base_url=f"http://127.0.0.1:{srv.port}/v1", api_key="x", max_retries=0, timeout=60) as c:
        yield c


def png_url(width, height):
    buf = io.BytesIO()
    Image.new("RGB", (width, height)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def image_part(url):
    return {"type": "image_url", "image_url": {"url": url}}


def text_part(text=QUESTION):
    return {"type": "text", "text": text}


def chat(content, model=NAME, **fields):
    """A request body: one user message with `content`, greedy, few tokens."""
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": MAX_TOKENS,
            "temperature": 0, **fields}


def request(port, method, path, body=None, headers=None, timeout=30):
    """(status, JSON reply) of one raw HTTP request on a fresh connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        reply = conn.getresponse()
        return reply.status, json.loads(reply.read())
    finally:
        conn.close()


def post(port, payload, **kw):
    """POST to the chat endpoint: payload as raw bytes, or anything else as JSON."""
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return request(port, "POST", "/v1/chat/completions", body, {"Content-Type": "application/json"}, **kw)


def assert_error(status, reply, expected):
    """The status, and an OpenAI-style error body that says what was wrong."""
    assert status == expected, reply
    assert isinstance(reply["error"]["message"], str) and reply["error"]["message"]
    assert reply["error"]["code"] == expected


def raw_exchange(port, data, timeout=10):
    """Send raw bytes on a socket and return the start of the reply (for requests http.client won't make)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        return s.recv(4096)


def raw_replies(port, data, timeout=30):
    """Send raw bytes on a socket and return all the server sends back until it closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        replies = b""
        while chunk := s.recv(65536):
            replies += chunk
        return replies


# ----------------------------------------------------------------------------- the openai client, end to end

def test_models_lists_plain_two_step_and_zoom(client):
    assert [m.id for m in client.models.list()] == [NAME, TWO_STEP, ZOOM]


def test_chat_with_image(srv, client):
    r = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": [
        image_part(srv.image_url), text_part()]}], max_tokens=MAX_TOKENS, temperature=0)
    assert isinstance(r, openai.types.chat.ChatCompletion)
    assert r.object == "chat.completion" and r.model == NAME and r.id.startswith("chatcmpl-")
    assert len(r.choices) == 1 and r.choices[0].index == 0
    assert r.choices[0].message.role == "assistant" and isinstance(r.choices[0].message.content, str)
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 0 and 0 < r.usage.completion_tokens <= MAX_TOKENS
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_greedy_is_deterministic_and_the_in_process_path(srv, client):
    """Greedy replies repeat, and equal common.generate on the same messages and image: the server runs
    the same encode/generate path as training and evaluation, with the image decoded the same way."""
    messages = [{"role": "user", "content": [image_part(srv.image_url), text_part()]}]
    texts = [client.chat.completions.create(model=NAME, messages=messages, max_tokens=MAX_TOKENS,
                                            temperature=0).choices[0].message.content for _ in range(2)]
    ex = common.Example({"id": "local"}, None, [{"role": "user", "content": [{"type": "image"}, text_part()]}])
    local = common.generate(srv.model, srv.processor, [ex], max_new_tokens=MAX_TOKENS, images=[[srv.image]])
    assert texts[0] == texts[1] == local[0]


def test_two_step_returns_answer_and_focus(srv, client):
    r = client.chat.completions.create(model=TWO_STEP, messages=[{"role": "user", "content": [
        image_part(srv.image_url), text_part()]}], max_tokens=MAX_TOKENS, temperature=0)
    assert r.model == TWO_STEP and len(r.choices) == 1
    choice = r.choices[0]
    assert isinstance(choice.message.content, str) and choice.finish_reason in ("stop", "length")
    focus = choice.model_extra["focus"]  # not in the OpenAI schema: pydantic keeps it as an extra field
    assert focus == choice.to_dict()["focus"]
    assert isinstance(focus["box_text"], str)
    box = focus["box"]  # None when the (random) model's box text does not parse
    assert box is None or (len(box) == 4 and all(isinstance(v, (int, float)) for v in box))
    crop, (w, h) = focus["crop"], srv.image.size
    assert isinstance(crop, list) and len(crop) == 4 and all(type(v) is int for v in crop)
    assert 0 <= crop[0] < crop[2] <= w and 0 <= crop[1] < crop[3] <= h
    # The same chain as `infer.py --data` (greedy): same box text, crop and answer.
    row = infer.run_batch(srv.model, srv.processor, [{"id": "0", "question": QUESTION}], [srv.image],
                          max_new_tokens=MAX_TOKENS)[0]
    assert (choice.message.content, focus) == (row["answer"], {k: row[k] for k in ("box_text", "box", "crop")})


def test_zoom_returns_answer_views_and_turns(srv, client):
    """The zoom model runs infer.py's zoom loop: the same answer, boxes, views and turns as `--mode zoom`."""
    r = client.chat.completions.create(model=ZOOM, messages=[{"role": "user", "content": [
        image_part(srv.image_url), text_part()]}], max_tokens=MAX_TOKENS, temperature=0)
    assert r.model == ZOOM and len(r.choices) == 1
    choice = r.choices[0]
    focus = choice.model_extra["focus"]
    row = infer.run_batch(srv.model, srv.processor, [{"id": "0", "question": QUESTION}], [srv.image], mode="zoom",
                          max_new_tokens=MAX_TOKENS)[0]
    assert (choice.message.content, focus) == (row["answer"], {k: row[k] for k in (
        "boxes", "views", "turns", "invalid_call", "max_turns_hit", "context_hit", "last_turn")})
    assert 1 <= focus["turns"] <= srv.args.max_turns
    assert r.usage.completion_tokens == row["usage"]["zoom"]["completion_tokens"] > 0


@pytest.mark.parametrize("model", [NAME, TWO_STEP, ZOOM])
def test_n_choices(srv, client, model):
    # Default temperature (1.0): the sampled path, which n is for.
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": [
        image_part(srv.image_url), text_part()]}], max_tokens=MAX_TOKENS, n=2)
    assert [c.index for c in r.choices] == [0, 1]
    assert all(isinstance(c.message.content, str) for c in r.choices)


def test_text_only_chat(client):
    r = client.chat.completions.create(model=NAME, messages=[
        {"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello"}],
        max_tokens=MAX_TOKENS, temperature=0)
    assert len(r.choices) == 1 and isinstance(r.choices[0].message.content, str)
    assert r.usage.prompt_tokens > 0


def test_null_fields_take_defaults(srv):
    # OpenAI marks n, temperature and max_tokens nullable, and some clients send null for "not set".
    status, reply = post(srv.port, chat("Hello", n=None, temperature=None, max_tokens=None,
                                        max_completion_tokens=MAX_TOKENS))
    assert status == 200 and len(reply["choices"]) == 1 and reply["usage"]["completion_tokens"] <= MAX_TOKENS


def test_no_op_fields_are_accepted_a_seed_repeats_samples_and_a_tiny_temperature_is_greedy(srv):
    neutral = dict(top_p=1, stop=[], logprobs=False, frequency_penalty=0, presence_penalty=0,
                   response_format={"type": "text"}, user="someone")
    sampled = [post(srv.port, chat("Hello", temperature=1.0, n=2, seed=7, **neutral)) for _ in range(2)]
    assert all(status == 200 for status, _ in sampled)
    assert sampled[0][1]["choices"] == sampled[1][1]["choices"]  # the same seed, the same samples
    greedy = [post(srv.port, chat("Hello", temperature=t))[1]["choices"][0]["message"] for t in (0, 1e-45)]
    assert greedy[0] == greedy[1]  # 1e-45 would overflow logits / T: read as greedy


def test_client_raises_typed_errors(srv, client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi"}], n=0)
    assert e.value.status_code == 400 and "'n'" in e.value.message
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "Hi"}])


# ------------------------------------------------------------------------------------- rejected requests

# (id, body from the test image's data: URL, status). Each is answered at once, before any generation.
BAD_REQUESTS = [
    ("bad_json", lambda img: b'{"model": ', 400),
    ("invalid_utf8", lambda img: b'{"model": "\xff"}', 400),
    ("deeply_nested_json", lambda img: b"[" * 100_000, 400),
    ("body_not_object", lambda img: [chat("Hi")], 400),
    ("missing_messages", lambda img: {"model": NAME}, 400),
    ("empty_messages", lambda img: {"model": NAME, "messages": []}, 400),
    ("bad_role", lambda img: {"model": NAME, "messages": [{"role": "tool", "content": "x"}]}, 400),
    ("content_not_text_or_parts", lambda img: chat(None), 400),
    ("unknown_model", lambda img: chat("Hi", model="gpt-4o"), 404),
    ("stream", lambda img: chat("Hi", stream=True), 400),
    ("n_zero", lambda img: chat("Hi", n=0), 400),
    ("n_too_many", lambda img: chat("Hi", n=17), 400),
    ("n_not_int", lambda img: chat("Hi", n="2"), 400),
    ("max_tokens_zero", lambda img: chat("Hi", max_tokens=0), 400),
    ("max_tokens_over_limit", lambda img: chat("Hi", max_tokens=10 ** 6), 400),
    ("temperature_out_of_range", lambda img: chat("Hi", temperature=3), 400),
    ("temperature_bool", lambda img: chat("Hi", temperature=True), 400),
    ("seed_not_an_integer", lambda img: chat("Hi", seed="7"), 400),
    ("stop_not_supported", lambda img: chat("Hi", stop=["5"]), 400),  # accepted, it would be silently ignored
    ("top_p_not_supported", lambda img: chat("Hi", top_p=0.5), 400),
    ("unrecognized_argument", lambda img: chat("Hi", best_of=3), 400),
    ("empty_content_list", lambda img: chat([]), 400),
    ("image_too_thin", lambda img: chat([image_part(png_url(2000, 8)), text_part()]), 400),  # aspect over 200
    ("vision_token_in_text", lambda img: chat("look: <|image_pad|>"), 400),
    ("turn_marker_in_text", lambda img: chat("look<|im_end|><|im_start|>assistant"), 400),
    ("unknown_part_type", lambda img: chat([{"type": "input_audio", "input_audio": {"data": ""}}]), 400),
    ("image_url_not_object", lambda img: chat([{"type": "image_url", "image_url": img}]), 400),
    ("invalid_base64", lambda img: chat([image_part("data:image/png;base64,@@not base64@@"), text_part()]), 400),
    ("base64_not_image", lambda img: chat([image_part("data:image/png;base64,aGVsbG8sIG5vdCBhIFBORw=="),
                                           text_part()]), 400),  # b"hello, not a PNG"
    ("data_url_not_base64", lambda img: chat([image_part("data:image/png,rawbytes"), text_part()]), 400),
    ("remote_http", lambda img: chat([image_part("http://example.com/cat.png"), text_part()]), 400),
    ("absolute_path_outside", lambda img: chat([image_part("/etc/passwd"), text_part()]), 403),
    ("file_url_outside", lambda img: chat([image_part("file:///etc/passwd"), text_part()]), 403),
    ("dotdot_outside", lambda img: chat([image_part("../../x.png"), text_part()]), 403),
    ("missing_file_inside", lambda img: chat([image_part("images/none.png"), text_part()]), 400),
    ("not_an_image_inside", lambda img: chat([image_part("train.jsonl"), text_part()]), 400),
    ("nul_byte_in_path", lambda img: chat([image_part("images/\x00.png"), text_part()]), 400),
    ("two_step_no_image", lambda img: chat([text_part()], model=TWO_STEP), 400),
    ("two_step_two_images", lambda img: chat([image_part(img), image_part(img), text_part()], TWO_STEP), 400),
    ("two_step_no_question", lambda img: chat([image_part(img)], model=TWO_STEP), 400),
]


@pytest.mark.parametrize("make_body,expected", [c[1:] for c in BAD_REQUESTS], ids=[c[0] for c in BAD_REQUESTS])
def test_bad_request(srv, make_body, expected):
    assert_error(*post(srv.port, make_body(srv.image_url)), expected)


def test_local_image_inside_image_dir(srv):
    """A path (plain or file:) under --image_dir is read, and gives the same reply as the image sent inline."""
    replies = [post(srv.port, chat([image_part(url), text_part()]))
               for url in (IMAGE, "file://" + IMAGE, str(srv.toy / "data" / IMAGE), srv.image_url)]
    assert [status for status, _ in replies] == [200] * 4
    assert len({reply["choices"][0]["message"]["content"] for _, reply in replies}) == 1


def test_symlink_out_of_image_dir_is_refused(srv, tmp_path):
    # The check is on the resolved path: a link inside the directory cannot lead out of it.
    (tmp_path / "inside").mkdir()
    (tmp_path / "inside" / "link.png").symlink_to(srv.toy / "data" / IMAGE)
    with pytest.raises(infer.RequestError) as e:
        infer.open_image("link.png", str(tmp_path / "inside"), MAX_IMAGE_PIXELS)
    assert e.value.status == 403
    with pytest.raises(infer.RequestError) as e:  # and without --image_dir, no local path at all
        infer.open_image(IMAGE, None, MAX_IMAGE_PIXELS)
    assert e.value.status == 403


def test_remote_image_is_never_fetched(srv, monkeypatch):
    """A remote URL is refused without a name lookup or a connection: only the test's own connection to
    the server is made (a fetch attempt of this unresolvable host would also show as a timeout)."""
    lookups, connects = [], []
    real_getaddrinfo, real_connect = socket.getaddrinfo, socket.socket.connect

    def getaddrinfo(host, *a, **k):
        lookups.append(host)
        return real_getaddrinfo(host, *a, **k)

    def connect(self, addr):
        connects.append(addr)
        return real_connect(self, addr)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", connect)
    for url in ("https://images.example.invalid/cat.png", "HTTPS://images.example.invalid/cat.png",
                "ftp://images.example.invalid/cat.png"):
        assert_error(*post(srv.port, chat([image_part(url), text_part()]), timeout=10), 400)
    assert set(lookups) == {"127.0.0.1"} and {addr[0] for addr in connects} == {"127.0.0.1"}


def test_unknown_routes(srv):
    assert_error(*request(srv.port, "GET", "/v1/nothing"), 404)
    assert_error(*request(srv.port, "GET", "/v1/chat/completions"), 404)
    assert_error(*request(srv.port, "POST", "/v1/completions", b"{}"), 404)
    assert request(srv.port, "GET", "/health") == (200, {"status": "ok"})
    for method in ("PUT", "DELETE", "PATCH", "OPTIONS"):
        assert_error(*request(srv.port, method, "/v1/chat/completions", b"{}"), 405)
    # A number of 5000 digits is refused by the JSON reader itself (Python's int limit): still a 400.
    assert_error(*post(srv.port, b'{"model": "x", "max_tokens": 1' + b"0" * 5000 + b"}"), 400)


def test_oversized_body_is_refused_and_the_server_goes_on(srv):
    """> --max_body_mb (0.5 MB): 413 before the body is parsed; the server still answers afterwards."""
    body = json.dumps(chat("x" * 600_000)).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{srv.port}/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert_error(e.value.code, json.loads(e.value.read()), 413)
    # Far past the socket buffers: a client that writes the whole body before reading (http.client, urllib,
    # common.http_chat) still gets the 413, not a broken pipe or a reset connection.
    assert_error(*post(srv.port, b"x" * 8_000_000), 413)
    status, reply = request(srv.port, "GET", "/v1/models")
    assert status == 200 and len(reply["data"]) == 3


def test_bad_content_length_does_not_hang(srv):
    # Missing: 411. Negative: 400 at once (reading "to the end" would wait for the client to close).
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
    assert raw_exchange(srv.port, head + b"\r\n").startswith(b"HTTP/1.1 411")
    assert raw_exchange(srv.port, head + b"Content-Length: -1\r\n\r\n{}").startswith(b"HTTP/1.1 400")


# A body whose end is not given by exactly one Content-Length of digits (RFC 9112 section 6.3).
SMUGGLED = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
BAD_FRAMING = [
    ("two_lengths", b"Content-Length: 2\r\nContent-Length: 50\r\n"),
    ("two_equal_lengths", b"Content-Length: 2\r\nContent-Length: 2\r\n"),
    ("length_list", b"Content-Length: 2, 50\r\n"),
    ("chunked_and_length", b"Transfer-Encoding: chunked\r\nContent-Length: 2\r\n"),
    ("chunked", b"Transfer-Encoding: chunked\r\n"),
    ("length_with_underscore", b"Content-Length: 5_0\r\n"),  # int() reads 50
    ("length_with_sign", b"Content-Length: +2\r\n"),
    ("length_of_19_digits", b"Content-Length: " + b"9" * 19 + b"\r\n"),
]


@pytest.mark.parametrize("headers", [c[1] for c in BAD_FRAMING], ids=[c[0] for c in BAD_FRAMING])
def test_ambiguous_body_framing_is_refused(srv, headers):
    """400, and the connection closed: where the body ends is not known, so nothing after the headers may be
    read as the next request. A server that took the first length would read 2 bytes and then answer the GET
    /health hidden in the body as well."""
    replies = raw_replies(srv.port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n{}"
                          + SMUGGLED)
    assert replies.startswith(b"HTTP/1.1 400") and replies.count(b"HTTP/1.1 ") == 1, replies
    assert json.loads(replies.split(b"\r\n\r\n", 1)[1])["error"]["code"] == 400


def test_an_unread_body_is_never_read_as_the_next_request(srv):
    # A POST to an unknown route is refused without reading its body: the connection closes after the 404.
    replies = raw_replies(srv.port, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"
                          + SMUGGLED)
    assert replies.startswith(b"HTTP/1.1 404") and replies.count(b"HTTP/1.1 ") == 1, replies
    # Nor is a body a GET carries: the answer comes, then the connection closes.
    for framing in (b"Content-Length: 2\r\n\r\n{}", b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"):
        replies = raw_replies(srv.port, b"GET /health HTTP/1.1\r\nHost: x\r\n" + framing + SMUGGLED)
        assert replies.startswith(b"HTTP/1.1 200") and replies.count(b"HTTP/1.1 ") == 1, replies


def test_keep_alive_after_an_error(srv):
    """A rejected request leaves the connection usable: the next request on it is answered normally."""
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
    try:
        for body, expected in ((b"not json", 400), (json.dumps(chat("Hi", model="nope")).encode(), 404),
                               (json.dumps(chat("Hi")).encode(), 200)):
            conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
            reply = conn.getresponse()
            assert reply.status == expected and json.loads(reply.read())
    finally:
        conn.close()


def png_claiming(width, height):
    """A 100-byte PNG whose header says width x height: what a client can send to make a server decode
    gigabytes (its pixels are missing, so only a reader that looks at the header first survives it)."""
    import struct
    import zlib
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", width, height)  # IHDR's width and height, then its CRC
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return "data:image/png;base64," + base64.b64encode(bytes(data)).decode()


def test_images_over_the_pixel_cap_are_refused_before_decoding(srv, client, monkeypatch):
    """12000 x 12000 declared in 100 bytes: 413 from its header, no pixel decoded, with the openai client and
    a raw request alike; an image under the cap is answered."""
    huge, just_over = png_claiming(12000, 12000), png_claiming(401, 300)
    decoded = []
    real_load = Image.Image.load
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append(self.size) or real_load(self))
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": [
            image_part(huge), text_part()]}], max_tokens=MAX_TOKENS)
    assert e.value.status_code == 413 and "12000x12000" in e.value.message and "--max_image_pixels" in e.value.message
    assert_error(*post(srv.port, chat([image_part(just_over), text_part()])), 413)
    assert decoded == []
    assert post(srv.port, chat([image_part(srv.image_url), text_part()]))[0] == 200


def test_an_image_over_pils_own_limit_gets_the_same_413(srv, client):
    """20000 x 20000 is over twice PIL's decompression-bomb limit, which PIL enforces as it opens the image,
    before the server sees the size: still the 413 naming --max_image_pixels, not PIL's text. The flag cannot
    go above PIL's limit, so an image PIL refuses is always over the server's cap too."""
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": [
            image_part(png_claiming(20000, 20000)), text_part()]}], max_tokens=MAX_TOKENS)
    assert e.value.status_code == 413 and "--max_image_pixels" in e.value.message
    assert "bomb" not in e.value.message
    with pytest.raises(SystemExit):
        infer.parse_args(["--serve", "--model", "m", "--max_image_pixels", str(Image.MAX_IMAGE_PIXELS + 1)])


def test_a_request_s_images_are_capped_together_before_any_is_decoded(srv, monkeypatch):
    """Images each under --max_image_pixels still add up: over --max_request_pixels in all (across messages),
    or more than --max_images of them, is 413 naming the flag, read from the headers with no pixel decoded
    (the audit's 400 images of 1000 x 1000 took 11 s and 3 GB). At the caps, answered."""
    at_image_cap = png_claiming(400, 300)  # MAX_IMAGE_PIXELS each, pixel data missing: decoding would fail
    small = png_url(28, 28)
    decoded = []
    real_load = Image.Image.load
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append(self.size) or real_load(self))
    over = {"model": NAME, "max_tokens": MAX_TOKENS, "messages": [
        {"role": "user", "content": [image_part(at_image_cap), image_part(at_image_cap), text_part()]},
        {"role": "assistant", "content": "A circle."},
        {"role": "user", "content": [image_part(at_image_cap), image_part(at_image_cap), text_part()]}]}
    status, reply = post(srv.port, over)
    assert_error(status, reply, 413)
    message = reply["error"]["message"]
    assert "--max_request_pixels" in message and str(4 * MAX_IMAGE_PIXELS) in message
    status, reply = post(srv.port, chat([image_part(small)] * (MAX_IMAGES + 1) + [text_part()]))
    assert_error(status, reply, 413)
    assert "--max_images" in reply["error"]["message"]
    assert decoded == []
    assert post(srv.port, chat([image_part(png_url(400, 300))] * 3 + [text_part()]))[0] == 200
    assert post(srv.port, chat([image_part(small)] * MAX_IMAGES + [text_part()]))[0] == 200


def test_generation_stops_at_max_generate_s(srv, client, monkeypatch):
    """A request's generation is bounded in time as well as in tokens: past --max_generate_s it stops, and
    says so (finish_reason 'length'). A bound of a microsecond stops after the first token."""
    monkeypatch.setattr(srv.args, "max_generate_s", 1e-6)
    reply = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=8,
                                           temperature=0)
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 1


def test_max_pixels_lowers_the_vision_tokens_an_image_costs(srv, run):
    """infer.py --max_pixels sets the processor's resize limit: the same image costs fewer prompt tokens."""
    image = str(srv.toy / "data" / IMAGE)
    tokens = []
    for extra in ((), ("--max_pixels", str(56 * 56))):
        p = run("infer.py", "--model", srv.args.model, "--image", image, "--question", QUESTION, "--mode", "direct",
                "--max_new_tokens", "2", *extra)
        assert p.rc == 0, p.stderr[-2000:]
        tokens.append(json.loads(p.stdout.strip().splitlines()[-1])["usage"]["answer"]["prompt_tokens"])
    assert tokens[1] < tokens[0]


def test_a_body_shorter_than_its_content_length_times_out(srv):
    """--read_timeout (3 s here) bounds the whole body: a client that sends less than it announced, or
    trickles it, gets 408 and the connection back, instead of holding a thread forever; the server goes on."""
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
    assert raw_exchange(srv.port, head + b'{"model": ', timeout=60).startswith(b"HTTP/1.1 408")
    with socket.create_connection(("127.0.0.1", srv.port), timeout=60) as s:
        s.sendall(head)
        for _ in range(30):  # 1 byte every 0.2 s: each read is quick, the whole body would take 20 s
            try:
                s.sendall(b" ")
            except OSError:  # the server answered and closed meanwhile
                break
            time.sleep(0.2)
        assert s.recv(4096).startswith(b"HTTP/1.1 408")
    assert request(srv.port, "GET", "/health") == (200, {"status": "ok"})


# ------------------------------------------------------------------------------------------------ binding

def test_binds_to_localhost_by_default(monkeypatch, capsys):
    assert infer.parse_args(["--serve", "--model", "m"]).host == "127.0.0.1"
    # serve() itself: binds there, names the model as served, prints the URL. No model is needed to list.
    servers = []

    class Recording(ThreadingHTTPServer):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            servers.append(self)

    monkeypatch.setattr(infer, "ThreadingHTTPServer", Recording)
    args = infer.parse_args(["--serve", "--model", "/models/some-model/", "--port", "0", "--served_name", "mine"])
    thread = threading.Thread(target=infer.serve, args=(None, None, args), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not servers and time.monotonic() < deadline:
            time.sleep(0.02)
        host, port = servers[0].server_address[:2]
        assert host == "127.0.0.1"
        assert [m["id"] for m in request(port, "GET", "/v1/models")[1]["data"]] == ["mine", "mine-two-step",
                                                                                  "mine-zoom"]
    finally:
        servers[0].shutdown()
        thread.join(timeout=10)
    assert f"http://127.0.0.1:{port}/v1" in capsys.readouterr().out
