"""The archaeclip site's plugin: what SQL alone cannot do.

- /-/thumb/<id>.jpg      a resized JPEG of an artifact's photo (BLOB), made once and cached
- /-/reverse-image-search a photo upload: embeds it (clip_embed_image, on a read-only connection
                          under Datasette's time limit), then runs the canned queries vector_search
                          and zero_shot with the vector (add .json for JSON; a raw image body works)
- /-/save-search          saves a search and its results in the writable saved-searches database
- /-/saved-searches[/<id>] lists them and shows one (add .json for JSON)
- render_cell             the photo column of the images table as a thumbnail
- extra_template_vars     the filter choices (distinct site, period, material, type) for templates

Every query a visitor causes runs on Datasette's read-only connections with its time limit; the
only write is the plugin's own parameterised INSERT into the saved-searches database.
Configuration: plugins.archaeclip-site in metadata.yaml.
"""
import asyncio
import base64
import email.parser
import email.policy
import io
import json
import re
import threading
from collections import OrderedDict

from datasette import hookimpl
from datasette.utils.asgi import Response
from markupsafe import Markup, escape

PLUGIN = "archaeclip-site"
MAX_UPLOAD_BYTES = 16 * 1024 * 1024  # a phone photo; the extension's own bound is 64 MiB
MAX_UPLOAD_PIXELS = 64_000_000  # the extension's bound, checked before decoding here too
MAX_SAVED_RESULTS = 200
MAX_SAVED_SEARCHES = 10_000  # anyone may save: bound what they can make the site store
THUMB_CACHE_BYTES = 32 * 1024 * 1024
FILTERS = ("site", "region", "period", "material", "object_type")
SAVED_SCHEMA = """
CREATE TABLE IF NOT EXISTS saved_searches(
  id INTEGER PRIMARY KEY, title TEXT NOT NULL, kind TEXT NOT NULL, query TEXT,
  filters TEXT, url TEXT, created TEXT NOT NULL DEFAULT (datetime('now')));
CREATE TABLE IF NOT EXISTS saved_results(
  search_id INTEGER NOT NULL REFERENCES saved_searches(id), rank INTEGER NOT NULL,
  artifact_id INTEGER NOT NULL, score REAL, PRIMARY KEY (search_id, rank));
"""


def config(datasette):
    c = {"database": "demo", "images_table": "artifacts", "images_column": "image",
         "saved_database": "site", "thumbnail_size": 160}
    c.update(datasette.plugin_config(PLUGIN) or {})
    return c


class ThumbnailCache:
    """Least recently used thumbnails, bounded in bytes (shared by all requests)."""

    def __init__(self, limit):
        self.limit, self.size, self.items, self.lock = limit, 0, OrderedDict(), threading.Lock()

    def get(self, key):
        with self.lock:
            value = self.items.get(key)
            if value is not None:
                self.items.move_to_end(key)
            return value

    def put(self, key, value):
        with self.lock:
            if key in self.items:
                return
            self.items[key] = value
            self.size += len(value)
            while self.size > self.limit and self.items:
                _, old = self.items.popitem(last=False)
                self.size -= len(old)


CACHE = ThumbnailCache(THUMB_CACHE_BYTES)
# Uploads decode a visitor's photo (up to 64 megapixels, about 200 MB of pixels, in the extension
# and again for the preview): at most two at a time, so concurrent uploads cannot exhaust memory.
UPLOADS = asyncio.Semaphore(2)


def open_image(data):
    """A decoded PIL image, refusing oversized ones before decoding their pixels."""
    from PIL import Image

    im = Image.open(io.BytesIO(data))
    w, h = im.size
    if w * h > MAX_UPLOAD_PIXELS:
        raise ValueError(f"image of {w}x{h} pixels is over the limit of {MAX_UPLOAD_PIXELS:,}")
    im.draft("RGB", (1024, 1024))  # JPEG: decode at a reduced scale when that is enough
    return im.convert("RGB")


def thumbnail(data, size):
    """JPEG bytes of the image scaled to fit size x size (small photos are enlarged smoothly)."""
    from PIL import Image

    im = open_image(data)
    w, h = im.size
    scale = size / max(w, h)
    im = im.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    im.save(out, "JPEG", quality=85)
    return out.getvalue()


async def in_thread(fn, *args):
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


def error_response(message, status, as_json):
    if as_json:
        return Response.json({"ok": False, "error": message}, status=status)
    return Response.html(f"<p class='message-error'>{escape(message)}</p>", status=status)


async def thumb(datasette, request):
    c = config(datasette)
    id = int(request.url_vars["id"])
    key = (c["database"], id, c["thumbnail_size"])
    body = CACHE.get(key)
    if body is None:
        db = datasette.get_database(c["database"])
        sql = "SELECT [{}] FROM [{}] WHERE rowid = ?".format(c["images_column"], c["images_table"])
        row = (await db.execute(sql, [id])).first()
        if row is None or not isinstance(row[0], bytes):
            return Response.text("no such image", status=404)
        try:
            body = await in_thread(thumbnail, row[0], int(c["thumbnail_size"]))
        except Exception as e:  # a corrupt photo in the collection
            return Response.text(f"cannot make a thumbnail: {e}", status=500)
        CACHE.put(key, body)
    return Response(body, content_type="image/jpeg",
                    headers={"Cache-Control": "public, max-age=86400"})


async def read_body(request, limit):
    """The request body, or None if it is over limit bytes (stops reading there)."""
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        return None
    body, more = b"", True
    while more:
        message = await request.receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
        if len(body) > limit:
            return None
    return body


def parse_upload(content_type, body):
    """(image bytes or None, form fields) of a multipart form or a raw image body."""
    if not content_type.startswith("multipart/form-data"):
        return body or None, {}
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body)
    image, fields = None, {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True) or b""
        if name == "image":
            image = payload or None
        elif name:
            fields[name] = payload.decode("utf-8", "replace")
    return image, fields


async def canned(datasette, request, name):
    c = config(datasette)
    query = await datasette.get_canned_query(c["database"], name, request.actor)
    if query is None:
        raise KeyError(f"canned query {name} is not configured")
    return query["sql"]


async def upload_error(datasette, request, params, message, status, as_json):
    """The upload page again, with the reason the photo was refused."""
    if as_json:
        return error_response(message, status, True)
    return Response.html(await datasette.render_template(
        "archaeclip_upload.html", {"params": params, "results": None, "error": message}, request=request),
        status=status)


async def reverse_image_search(datasette, request):
    c = config(datasette)
    as_json = request.url_vars.get("format") == ".json"
    params = {name: request.args.get(name, "") for name in FILTERS + ("k",)}
    if request.method != "POST":
        return Response.html(await datasette.render_template(
            "archaeclip_upload.html", {"params": params, "results": None}, request=request))
    body = await read_body(request, MAX_UPLOAD_BYTES)
    if body is None:
        message = f"the photo is larger than {MAX_UPLOAD_BYTES // 1048576} MB"
        return await upload_error(datasette, request, params, message, 413, as_json)
    try:
        image, fields = parse_upload(request.headers.get("content-type", ""), body)
    except Exception as e:
        return await upload_error(datasette, request, params, f"cannot read the upload: {e}", 400, as_json)
    for name in FILTERS + ("k",):
        params[name] = fields.get(name, params[name])[:200]
    if not image:
        return await upload_error(datasette, request, params, "choose a photo to upload", 400, as_json)
    async with UPLOADS:
        return await search_by_photo(datasette, request, c, image, params, as_json)


async def search_by_photo(datasette, request, c, image, params, as_json):
    db = datasette.get_database(c["database"])
    try:
        vector = (await db.execute("SELECT clip_embed_image(:image) AS v", {"image": image})).first()[0]
        results = (await db.execute(await canned(datasette, request, "vector_search"),
                                    {"vector": vector, **params})).rows
        labels = (await db.execute(await canned(datasette, request, "zero_shot"),
                                   {"vector": vector, "id": ""})).rows
    except Exception as e:  # the extension's message (not an image, too large) or the time limit
        return await upload_error(datasette, request, params, str(e), 400, as_json)
    if as_json:
        return Response.json({
            "ok": True,
            "results": [dict(r) for r in results],
            "zero_shot": [dict(r) for r in labels],
        })
    try:
        preview = await in_thread(thumbnail, image, int(c["thumbnail_size"]))
    except Exception:
        preview = None
    return Response.html(await datasette.render_template("archaeclip_upload.html", {
        "params": params, "results": results, "labels": labels,
        "preview": "data:image/jpeg;base64," + base64.b64encode(preview).decode() if preview else None,
    }, request=request))


def clean_results(raw):
    results = json.loads(raw or "[]")
    if not isinstance(results, list) or len(results) > MAX_SAVED_RESULTS:
        raise ValueError(f"results must be a list of at most {MAX_SAVED_RESULTS} [id, score] pairs")
    clean = []
    for item in results:
        id, score = item
        clean.append((int(id), None if score is None else float(score)))
    return clean


async def save_search(datasette, request):
    c = config(datasette)
    if request.method != "POST":
        return Response.redirect("/-/saved-searches")
    body = await read_body(request, 256 * 1024)
    if body is None:
        return error_response("the form is too large", 413, False)
    from urllib.parse import parse_qsl

    form = dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
    title = (form.get("title") or "").strip()[:200] or "untitled search"
    kind = form.get("kind", "")
    url = form.get("url", "")
    if kind not in ("concept", "more_like_this", "upload", "vector"):
        return error_response("unknown kind of search", 400, False)
    if not re.fullmatch(r"/(?![/\\])[^\s\\]{0,2000}", url):
        url = None  # only a path of this site: never javascript:, //host or /\host
    try:
        results = clean_results(form.get("results"))
    except (ValueError, TypeError) as e:
        return error_response(f"bad results: {e}", 400, False)
    db = datasette.get_database(c["saved_database"])

    def write(conn):
        with conn:  # one transaction: the search and its results, or nothing
            return insert(conn)

    def insert(conn):
        (count,) = conn.execute("SELECT count(*) FROM saved_searches").fetchone()
        if count >= MAX_SAVED_SEARCHES:
            return None
        cur = conn.execute(
            "INSERT INTO saved_searches(title, kind, query, filters, url) VALUES (?, ?, ?, ?, ?)",
            (title, kind, (form.get("query") or "")[:1000], (form.get("filters") or "")[:1000], url))
        conn.executemany(
            "INSERT INTO saved_results(search_id, rank, artifact_id, score) VALUES (?, ?, ?, ?)",
            [(cur.lastrowid, i + 1, id, score) for i, (id, score) in enumerate(results)])
        return cur.lastrowid

    search_id = await db.execute_write_fn(write, block=True)
    if search_id is None:
        return error_response(f"this site keeps at most {MAX_SAVED_SEARCHES:,} saved searches", 507, False)
    return Response.redirect(f"/-/saved-searches/{search_id}")


async def saved_searches(datasette, request):
    c = config(datasette)
    as_json = request.url_vars.get("format") == ".json"
    saved = datasette.get_database(c["saved_database"])
    if "id" not in request.url_vars:
        rows = (await saved.execute(
            "SELECT s.*, (SELECT count(*) FROM saved_results WHERE search_id = s.id) AS results "
            "FROM saved_searches s ORDER BY s.id DESC LIMIT 500")).rows
        if as_json:
            return Response.json({"ok": True, "searches": [dict(r) for r in rows]})
        return Response.html(await datasette.render_template(
            "archaeclip_saved.html", {"searches": rows, "search": None}, request=request))
    id = int(request.url_vars["id"])
    search = (await saved.execute("SELECT * FROM saved_searches WHERE id = ?", [id])).first()
    if search is None:
        return error_response("no such saved search", 404, as_json)
    ranked = (await saved.execute(
        "SELECT rank, artifact_id, score FROM saved_results WHERE search_id = ? ORDER BY rank", [id])).rows
    db = datasette.get_database(c["database"])
    meta = {r["id"]: dict(r) for r in (await db.execute(
        "SELECT id, label, object_type, material, decoration, period, century, site, region, country "
        "FROM [{}] WHERE id IN (SELECT value FROM json_each(?))".format(c["images_table"]),
        [json.dumps([r["artifact_id"] for r in ranked])])).rows}
    results = [{**meta.get(r["artifact_id"], {"id": r["artifact_id"], "label": "(no longer in the collection)"}),
                "score": r["score"], "rank": r["rank"]} for r in ranked]
    if as_json:
        return Response.json({"ok": True, "search": dict(search), "results": results})
    return Response.html(await datasette.render_template(
        "archaeclip_saved.html", {"searches": None, "search": search, "results": results}, request=request))


@hookimpl
def startup(datasette):
    async def inner():
        name = config(datasette)["saved_database"]
        if name in datasette.databases and datasette.databases[name].is_mutable:
            await datasette.get_database(name).execute_write_script(SAVED_SCHEMA, block=True)

    return inner


@hookimpl
def register_routes():
    return [
        (r"^/-/thumb/(?P<id>\d{1,18})\.jpg$", thumb),
        (r"^/-/reverse-image-search(?P<format>\.json)?$", reverse_image_search),
        (r"^/-/save-search$", save_search),
        (r"^/-/saved-searches(?P<format>\.json)?$", saved_searches),
        (r"^/-/saved-searches/(?P<id>\d{1,18})(?P<format>\.json)?$", saved_searches),
    ]


@hookimpl
def skip_csrf(scope):
    # The upload only searches (it writes nothing), and API clients post raw image bodies.
    return scope["type"] == "http" and scope["path"] in ("/-/reverse-image-search", "/-/reverse-image-search.json")


@hookimpl
def render_cell(row, value, column, table, database, datasette):
    c = config(datasette)
    if not (database == c["database"] and table == c["images_table"] and column == c["images_column"]
            and isinstance(value, bytes)):
        return None
    try:
        id = int(row["id"]) if "id" in row.keys() else int(row["rowid"])
    except (KeyError, TypeError, ValueError, IndexError):
        return None
    return Markup('<img class="archaeclip-cell-thumb" loading="lazy" width="64" height="64" '
                  'src="/-/thumb/{}.jpg" alt="photo of artifact {}">').format(id, id)


@hookimpl
def extra_template_vars(template, database, request, datasette):
    c = config(datasette)
    if database != c["database"] and not template.startswith("archaeclip_"):
        return {}

    async def inner():
        db = datasette.get_database(c["database"])
        choices = {}
        for name in FILTERS:
            try:
                rows = await db.execute(
                    "SELECT [{0}] AS value, count(*) AS n FROM [{1}] WHERE [{0}] IS NOT NULL "
                    "GROUP BY 1 ORDER BY 1".format(name, c["images_table"]))
                choices[name] = [(r["value"], r["n"]) for r in rows.rows]
            except Exception:
                choices[name] = []
        extra = {"archaeclip_choices": choices, "archaeclip_database": c["database"]}
        if template.startswith("query-") and template.endswith("training_curve.html"):
            extra["archaeclip_evaluations"] = (await db.execute(
                "SELECT * FROM evaluations ORDER BY run_id, direction DESC")).rows
            extra["archaeclip_runs"] = (await db.execute(
                "SELECT id, model FROM training_runs ORDER BY id")).rows
        return extra

    return inner
