#!/usr/bin/env python3
"""Probe what the local S3 servers (moto, SeaweedFS) do with the requests flag's S3 backend
will send through object_store 0.13: conditional PUT (If-None-Match: * / If-Match: etag),
conditional GET/DELETE, multipart visibility and crash persistence, racing creates, listing,
and rough throughput. Prints one table; exits 0 even when a server deviates (it is a survey).

Run with the s3 venv's python after .ci/s3/up.sh:
    ~/.cache/flag/s3-venv/bin/python .ci/s3/probe.py [moto|seaweedfs|both] [--no-crash] [--no-perf]
--no-crash skips the kill -9 / restart step (it restarts the server through up.sh).
"""
import argparse
import hashlib
import os
import subprocess
import sys
import threading
import time
import uuid

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

HERE = os.path.dirname(os.path.abspath(__file__))
STATE = os.environ.get("FLAG_S3_DIR") or os.path.join(
    os.environ.get("FLAG_CACHE", os.path.expanduser("~/.cache/flag")), "s3")
ACCESS = os.environ.get("FLAG_S3_ACCESS_KEY", "flagtest")
SECRET = os.environ.get("FLAG_S3_SECRET_KEY", "flagtestsecret")
REGION = os.environ.get("FLAG_S3_REGION", "us-east-1")
ENDPOINTS = {
    "moto": "http://127.0.0.1:%s" % os.environ.get("FLAG_S3_MOTO_PORT", "5055"),
    "seaweedfs": "http://127.0.0.1:%s" % os.environ.get("FLAG_S3_WEED_PORT", "5056"),
}
MIB = 1024 * 1024


def client(endpoint, secret=SECRET, pool=16):
    # No retries (we want the first status), and no flexible checksums/aws-chunked uploads:
    # object_store signs a plain body (x-amz-content-sha256), so do the same.
    cfg = Config(retries={"max_attempts": 1, "mode": "standard"}, connect_timeout=2, read_timeout=60,
                 request_checksum_calculation="when_required",
                 response_checksum_validation="when_required",
                 max_pool_connections=pool, s3={"addressing_style": "path"})
    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=ACCESS,
                        aws_secret_access_key=secret, region_name=REGION, config=cfg)


def call(fn, **kw):
    """(status, error code or '', response or None)"""
    try:
        r = fn(**kw)
        return r["ResponseMetadata"]["HTTPStatusCode"], "", r
    except ClientError as e:
        st = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        code = e.response.get("Error", {}).get("Code", "")
        return st, code, None


def fmt(st, code):
    return f"{st} {code}".strip()


def body(s3, bucket, key):
    st, code, r = call(s3.get_object, Bucket=bucket, Key=key)
    return r["Body"].read() if r else None


def probe_conditional(s3, bucket, res):
    p = "probe-%s/" % uuid.uuid4().hex[:8]
    k = p + "cond"
    # a. create-if-absent
    st, code, r = call(s3.put_object, Bucket=bucket, Key=k, Body=b"one", IfNoneMatch="*")
    res["a1 PUT If-None-Match:* absent"] = fmt(st, code)
    etag1 = r["ETag"] if r else None
    st, code, _ = call(s3.put_object, Bucket=bucket, Key=k, Body=b"two", IfNoneMatch="*")
    now = body(s3, bucket, k)
    res["a2 PUT If-None-Match:* present"] = "%s; stored=%s" % (
        fmt(st, code), "kept" if now == b"one" else "OVERWRITTEN" if now == b"two" else repr(now))

    # b. compare-and-swap
    st, code, r = call(s3.put_object, Bucket=bucket, Key=k, Body=b"three", IfMatch=etag1)
    now = body(s3, bucket, k)
    res["b1 PUT If-Match matching"] = "%s; stored=%s" % (
        fmt(st, code), "updated" if now == b"three" else repr(now))
    etag3 = r["ETag"] if r else None
    st, code, _ = call(s3.put_object, Bucket=bucket, Key=k, Body=b"four", IfMatch='"0123456789abcdef0123456789abcdef"')
    now = body(s3, bucket, k)
    res["b2 PUT If-Match stale"] = "%s; stored=%s" % (
        fmt(st, code), "kept" if now == b"three" else "OVERWRITTEN" if now == b"four" else repr(now))
    st, code, _ = call(s3.put_object, Bucket=bucket, Key=k, Body=b"five", IfMatch=etag1)
    now = body(s3, bucket, k)
    res["b2' PUT If-Match old etag (after update)"] = "%s; stored=%s" % (
        fmt(st, code), "kept" if now == b"three" else "OVERWRITTEN" if now == b"five" else repr(now))
    absent = p + "absent"
    st, code, _ = call(s3.put_object, Bucket=bucket, Key=absent, Body=b"x", IfMatch=etag3 or '"x"')
    created = body(s3, bucket, absent) is not None
    res["b3 PUT If-Match key absent"] = "%s; %s" % (fmt(st, code), "CREATED" if created else "not created")

    # c. etags
    md5 = '"%s"' % hashlib.md5(b"three").hexdigest()
    h1 = call(s3.head_object, Bucket=bucket, Key=k)[2]
    h2 = call(s3.head_object, Bucket=bucket, Key=k)[2]
    lst = s3.list_objects_v2(Bucket=bucket, Prefix=k).get("Contents", [])
    le = lst[0]["ETag"] if lst else None
    res["c1 ETag form (PUT resp)"] = "%s (%s)" % (etag3, "quoted md5" if etag3 == md5 else
                                                  "quoted" if etag3 and etag3.startswith('"') else "UNQUOTED")
    res["c2 ETag PUT==HEAD==HEAD==LIST"] = "yes" if etag3 == h1["ETag"] == h2["ETag"] == le else \
        "NO put=%s head=%s head=%s list=%s" % (etag3, h1["ETag"], h2["ETag"], le)
    k2 = p + "same"
    e_a = call(s3.put_object, Bucket=bucket, Key=k2, Body=b"same")[2]["ETag"]
    e_b = call(s3.put_object, Bucket=bucket, Key=k2, Body=b"same")[2]["ETag"]
    res["c3 same bytes re-PUT -> same ETag"] = "yes" if e_a == e_b else "NO (%s vs %s)" % (e_a, e_b)
    st, code, _ = call(s3.get_object, Bucket=bucket, Key=k, IfNoneMatch=etag3)
    res["c4 GET If-None-Match current"] = fmt(st, code)
    st, code, _ = call(s3.get_object, Bucket=bucket, Key=k, IfNoneMatch=etag1)
    res["c5 GET If-None-Match other"] = fmt(st, code)
    st, code, _ = call(s3.head_object, Bucket=bucket, Key=k, IfNoneMatch=etag3)
    res["c6 HEAD If-None-Match current"] = fmt(st, code)
    st, code, _ = call(s3.get_object, Bucket=bucket, Key=k, IfMatch=etag1)
    res["c7 GET If-Match stale"] = fmt(st, code)
    st, code, _ = call(s3.get_object, Bucket=bucket, Key=k, IfMatch=etag3)
    res["c8 GET If-Match current"] = fmt(st, code)
    st, code, r = call(s3.get_object, Bucket=bucket, Key=k, Range="bytes=1-3")
    res["c9 GET Range bytes=1-3"] = "%s %r" % (fmt(st, code), r["Body"].read() if r else None)
    st, code, _ = call(s3.head_object, Bucket=bucket, Key=p + "nothing-here")
    res["c10 HEAD missing key"] = fmt(st, code)
    return p


def probe_list_delete(s3, bucket, res):
    p = "probe-%s/" % uuid.uuid4().hex[:8]
    for k in ("a/x", "a/y/z", "a/y/w", "b"):
        s3.put_object(Bucket=bucket, Key=p + k, Body=k.encode())
    r = s3.list_objects_v2(Bucket=bucket, Prefix=p + "a/", Delimiter="/")
    keys = [o["Key"][len(p):] for o in r.get("Contents", [])]
    cps = [c["Prefix"][len(p):] for c in r.get("CommonPrefixes", [])]
    ok = keys == ["a/x"] and cps == ["a/y/"]
    res["f1 LIST prefix a/ delim /"] = ("ok" if ok else "UNEXPECTED") + " keys=%s prefixes=%s" % (keys, cps)
    r = s3.list_objects_v2(Bucket=bucket, Prefix=p, Delimiter="/")
    keys = [o["Key"][len(p):] for o in r.get("Contents", [])]
    cps = [c["Prefix"][len(p):] for c in r.get("CommonPrefixes", [])]
    res["f1' LIST prefix root delim /"] = ("ok" if keys == ["b"] and cps == ["a/"] else "UNEXPECTED") + \
        " keys=%s prefixes=%s" % (keys, cps)
    r = s3.list_objects_v2(Bucket=bucket, Prefix=p, MaxKeys=2)
    r2 = s3.list_objects_v2(Bucket=bucket, Prefix=p, MaxKeys=2,
                            ContinuationToken=r["NextContinuationToken"]) if r.get("IsTruncated") else {}
    n = len(r.get("Contents", [])) + len(r2.get("Contents", []))
    res["f1'' LIST pagination (MaxKeys=2)"] = "ok (2+%d)" % (n - 2) if r.get("IsTruncated") and n == 4 \
        else "UNEXPECTED truncated=%s n=%d" % (r.get("IsTruncated"), n)
    r = s3.list_objects_v2(Bucket=bucket, Prefix=p, StartAfter=p + "a/y/w")
    keys = [o["Key"][len(p):] for o in r.get("Contents", [])]
    res["f1''' LIST start-after"] = ("ok" if keys == ["a/y/z", "b"] else "UNEXPECTED") + " %s" % keys

    st, code, _ = call(s3.delete_object, Bucket=bucket, Key=p + "b")
    gone = call(s3.head_object, Bucket=bucket, Key=p + "b")[0]
    res["f2 DELETE existing"] = "%s; then HEAD %s" % (fmt(st, code), gone)
    st, code, _ = call(s3.delete_object, Bucket=bucket, Key=p + "never")
    res["f3 DELETE absent"] = fmt(st, code)
    # object_store 0.13's delete() goes through DeleteObjects (POST ?delete, Content-MD5).
    st, code, r = call(s3.delete_objects, Bucket=bucket,
                       Delete={"Objects": [{"Key": p + "a/x"}, {"Key": p + "never2"}], "Quiet": False})
    gone = call(s3.head_object, Bucket=bucket, Key=p + "a/x")[0]
    res["f4 DeleteObjects (bulk) existing+absent"] = "%s deleted=%d errors=%d; then HEAD %s" % (
        fmt(st, code), len(r.get("Deleted", [])) if r else -1, len(r.get("Errors", [])) if r else -1, gone)
    # The same with exactly the checksum headers object_store 0.13 sends on DeleteObjects
    # (Content-MD5 + x-amz-checksum-sha256 of the XML body), set through an event hook.
    s3.put_object(Bucket=bucket, Key=p + "c", Body=b"c")
    s3b = client(s3.meta.endpoint_url)

    def os_headers(request, **_):
        import base64
        for h in list(request.headers.keys()):
            if h.lower().startswith("x-amz-checksum") or h.lower() in ("content-md5", "x-amz-sdk-checksum-algorithm"):
                del request.headers[h]
        b = request.body if isinstance(request.body, bytes) else request.body.encode()
        request.headers["Content-MD5"] = base64.b64encode(hashlib.md5(b).digest()).decode()
        request.headers["x-amz-checksum-sha256"] = base64.b64encode(hashlib.sha256(b).digest()).decode()

    s3b.meta.events.register("before-sign.s3.DeleteObjects", os_headers)
    st, code, r = call(s3b.delete_objects, Bucket=bucket, Delete={"Objects": [{"Key": p + "c"}]})
    gone = call(s3.head_object, Bucket=bucket, Key=p + "c")[0]
    res["f4' DeleteObjects w/ Content-MD5+sha256 (object_store)"] = "%s deleted=%d; then HEAD %s" % (
        fmt(st, code), len(r.get("Deleted", [])) if r else -1, gone)
    k = p + "a/y/z"
    et = s3.head_object(Bucket=bucket, Key=k)["ETag"]
    st, code, _ = call(s3.delete_object, Bucket=bucket, Key=k, IfMatch='"0123456789abcdef0123456789abcdef"')
    still = call(s3.head_object, Bucket=bucket, Key=k)[0]
    res["f5 DELETE If-Match stale"] = "%s; then HEAD %s (%s)" % (
        fmt(st, code), still, "kept" if still == 200 else "DELETED ANYWAY")
    st, code, _ = call(s3.delete_object, Bucket=bucket, Key=k, IfMatch=et)
    gone = call(s3.head_object, Bucket=bucket, Key=k)[0]
    res["f6 DELETE If-Match current"] = "%s; then HEAD %s" % (fmt(st, code), gone)
    st, code, _ = call(s3.delete_object, Bucket=bucket, Key=p + "never3", IfMatch=et)
    res["f7 DELETE If-Match absent key"] = fmt(st, code)


def probe_auth(endpoint, bucket, res):
    bad = client(endpoint, secret="wrong-secret")
    st, code, _ = call(bad.put_object, Bucket=bucket, Key="probe-auth", Body=b"x")
    res["g1 PUT with wrong secret"] = fmt(st, code) + ("" if st == 403 else " (auth not enforced)")


def probe_race(s3, bucket, res, rounds=30, nthreads=2):
    p = "probe-%s/" % uuid.uuid4().hex[:8]
    bad_rounds = []
    other = set()
    for i in range(rounds):
        key = p + "race-%d" % i
        barrier = threading.Barrier(nthreads)
        out = [None] * nthreads

        def go(j):
            barrier.wait()
            out[j] = call(s3.put_object, Bucket=bucket, Key=key, Body=b"writer-%d" % j, IfNoneMatch="*")[:2]

        ts = [threading.Thread(target=go, args=(j,)) for j in range(nthreads)]
        [t.start() for t in ts]
        [t.join() for t in ts]
        winners = [j for j in range(nthreads) if out[j][0] == 200]
        for j in range(nthreads):
            if out[j][0] != 200:
                other.add(fmt(*out[j]))
        stored = body(s3, bucket, key)
        if len(winners) != 1 or stored != b"writer-%d" % winners[0]:
            bad_rounds.append((i, winners, stored))
    res["e1 %d racing If-None-Match:* creates x%d" % (nthreads, rounds)] = \
        ("exactly one won every round" if not bad_rounds else
         "VIOLATED in %d/%d rounds, e.g. winners=%s stored=%r" % (len(bad_rounds), rounds,
                                                                  bad_rounds[0][1], bad_rounds[0][2])) + \
        "; losers got %s" % (", ".join(sorted(other)) or "-")
    # Same race for compare-and-swap on a ref: all threads hold the same etag.
    bad_rounds = []
    other = set()
    for i in range(rounds):
        key = p + "cas-%d" % i
        et = s3.put_object(Bucket=bucket, Key=key, Body=b"base")["ETag"]
        barrier = threading.Barrier(nthreads)
        out = [None] * nthreads

        def go2(j):
            barrier.wait()
            out[j] = call(s3.put_object, Bucket=bucket, Key=key, Body=b"cas-%d" % j, IfMatch=et)[:2]

        ts = [threading.Thread(target=go2, args=(j,)) for j in range(nthreads)]
        [t.start() for t in ts]
        [t.join() for t in ts]
        winners = [j for j in range(nthreads) if out[j][0] == 200]
        for j in range(nthreads):
            if out[j][0] != 200:
                other.add(fmt(*out[j]))
        stored = body(s3, bucket, key)
        if len(winners) != 1 or stored != b"cas-%d" % winners[0]:
            bad_rounds.append((i, winners, stored))
    res["e2 %d racing If-Match:<same etag> updates x%d" % (nthreads, rounds)] = \
        ("exactly one won every round" if not bad_rounds else
         "VIOLATED in %d/%d rounds, e.g. winners=%s stored=%r" % (len(bad_rounds), rounds,
                                                                  bad_rounds[0][1], bad_rounds[0][2])) + \
        "; losers got %s" % (", ".join(sorted(other)) or "-")


def probe_multipart(s3, bucket, res):
    p = "probe-%s/" % uuid.uuid4().hex[:8]
    k = p + "mpu"
    part = os.urandom(5 * MIB)
    up = s3.create_multipart_upload(Bucket=bucket, Key=k)["UploadId"]
    e1 = s3.upload_part(Bucket=bucket, Key=k, UploadId=up, PartNumber=1, Body=part)["ETag"]
    head = call(s3.head_object, Bucket=bucket, Key=k)[0]
    listed = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=p).get("Contents", [])]
    res["d1 MPU after 1 part: key visible?"] = "HEAD %s, LIST %s" % (head, listed or "[]")
    ups = [u["UploadId"] for u in s3.list_multipart_uploads(Bucket=bucket, Prefix=p).get("Uploads", [])]
    res["d2 ListMultipartUploads shows it"] = "yes" if up in ups else "NO (%s)" % ups
    st, code, _ = call(s3.abort_multipart_upload, Bucket=bucket, Key=k, UploadId=up)
    head = call(s3.head_object, Bucket=bucket, Key=k)[0]
    ups = [u["UploadId"] for u in s3.list_multipart_uploads(Bucket=bucket, Prefix=p).get("Uploads", [])]
    res["d3 abort"] = "%s; then HEAD %s, still listed=%s" % (fmt(st, code), head, up in ups)
    # Complete, then a create-if-absent complete over an existing key (object_store's
    # CompleteMultipartMode::Create sends If-None-Match: * on CompleteMultipartUpload).
    up = s3.create_multipart_upload(Bucket=bucket, Key=k)["UploadId"]
    e1 = s3.upload_part(Bucket=bucket, Key=k, UploadId=up, PartNumber=1, Body=part)["ETag"]
    e2 = s3.upload_part(Bucket=bucket, Key=k, UploadId=up, PartNumber=2, Body=b"tail")["ETag"]
    st, code, r = call(s3.complete_multipart_upload, Bucket=bucket, Key=k, UploadId=up,
                       MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": e1}, {"PartNumber": 2, "ETag": e2}]})
    got = body(s3, bucket, k)
    res["d4 complete 2 parts"] = "%s; ETag %s; content %s" % (
        fmt(st, code), r["ETag"] if r else None, "ok" if got == part + b"tail" else "WRONG")
    up = s3.create_multipart_upload(Bucket=bucket, Key=k)["UploadId"]
    e1 = s3.upload_part(Bucket=bucket, Key=k, UploadId=up, PartNumber=1, Body=b"other")["ETag"]
    st, code, _ = call(s3.complete_multipart_upload, Bucket=bucket, Key=k, UploadId=up, IfNoneMatch="*",
                       MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": e1}]})
    got = body(s3, bucket, k)
    res["d5 CompleteMPU If-None-Match:* over existing"] = "%s; stored=%s" % (
        fmt(st, code), "kept" if got == part + b"tail" else "OVERWRITTEN" if got == b"other" else "?")
    call(s3.abort_multipart_upload, Bucket=bucket, Key=k, UploadId=up)


def kill9_and_restart(name):
    pidf = os.path.join(STATE, name + ".pid")
    pid = int(open(pidf).read().strip())
    os.kill(pid, 9)
    for _ in range(100):
        try:
            os.kill(pid, 0)
            time.sleep(0.05)
        except ProcessLookupError:
            break
    t0 = time.monotonic()
    subprocess.run([os.path.join(HERE, "up.sh"), name], check=True, stdout=subprocess.DEVNULL)
    return time.monotonic() - t0


def probe_crash(name, s3, bucket, res):
    p = "probe-%s/" % uuid.uuid4().hex[:8]
    k = p + "mpu-crash"
    done_key = p + "durable"
    s3.put_object(Bucket=bucket, Key=done_key, Body=b"durable-bytes")
    up = s3.create_multipart_upload(Bucket=bucket, Key=k)["UploadId"]
    e1 = s3.upload_part(Bucket=bucket, Key=k, UploadId=up, PartNumber=1, Body=os.urandom(5 * MIB))["ETag"]
    dt = kill9_and_restart(name)
    s3 = client(ENDPOINTS[name])
    bst = call(s3.head_bucket, Bucket=bucket)[0]
    head = call(s3.head_object, Bucket=bucket, Key=k)[0]
    durable = body(s3, bucket, done_key)
    st, code, _ = call(s3.list_multipart_uploads, Bucket=bucket, Prefix=p)
    ups = []
    if st == 200:
        ups = [u["UploadId"] for u in s3.list_multipart_uploads(Bucket=bucket, Prefix=p).get("Uploads", [])]
    res["d6 kill -9 mid-MPU, restart via up.sh"] = \
        "back in %.1fs; MPU key HEAD %s; PUT acked before kill %s; MPU still listed=%s" % (
            dt, head, "persisted" if durable == b"durable-bytes" else "LOST", up in ups)
    if bst == 200:
        st, code, _ = call(s3.complete_multipart_upload, Bucket=bucket, Key=k, UploadId=up,
                           MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": e1}]})
        res["d7 complete that MPU after restart"] = fmt(st, code)
        call(s3.abort_multipart_upload, Bucket=bucket, Key=k, UploadId=up)
    return s3


def probe_perf(s3, bucket, res):
    p = "perf-%s/" % uuid.uuid4().hex[:8]
    small = os.urandom(100 * 1024)
    t0 = time.monotonic()
    for i in range(200):
        s3.put_object(Bucket=bucket, Key=p + "s%03d" % i, Body=small)
    dt = time.monotonic() - t0
    res["t1 PUT 200 x 100 KiB, 1 thread"] = "%.2fs, %.0f obj/s, %.1f MiB/s" % (dt, 200 / dt, 200 * 0.1 / 1.024 / dt)
    from concurrent.futures import ThreadPoolExecutor
    t0 = time.monotonic()
    with ThreadPoolExecutor(8) as ex:
        list(ex.map(lambda i: s3.put_object(Bucket=bucket, Key=p + "c%03d" % i, Body=small), range(200)))
    dt = time.monotonic() - t0
    res["t2 PUT 200 x 100 KiB, 8 threads"] = "%.2fs, %.0f obj/s, %.1f MiB/s" % (dt, 200 / dt, 200 * 0.1 / 1.024 / dt)
    t0 = time.monotonic()
    for i in range(200):
        s3.get_object(Bucket=bucket, Key=p + "s%03d" % i)["Body"].read()
    dt = time.monotonic() - t0
    res["t3 GET 200 x 100 KiB, 1 thread"] = "%.2fs, %.0f obj/s" % (dt, 200 / dt)
    big = os.urandom(20 * MIB)
    t0 = time.monotonic()
    for i in range(5):
        s3.put_object(Bucket=bucket, Key=p + "b%d" % i, Body=big)
    dt = time.monotonic() - t0
    res["t4 PUT 5 x 20 MiB, 1 thread"] = "%.2fs, %.1f MiB/s" % (dt, 100 / dt)
    t0 = time.monotonic()
    for i in range(5):
        n = len(s3.get_object(Bucket=bucket, Key=p + "b%d" % i)["Body"].read())
        assert n == 20 * MIB
    dt = time.monotonic() - t0
    res["t5 GET 5 x 20 MiB, 1 thread"] = "%.2fs, %.1f MiB/s" % (dt, 100 / dt)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("which", nargs="?", default="both", choices=["moto", "seaweedfs", "both"])
    ap.add_argument("--no-crash", action="store_true")
    ap.add_argument("--no-perf", action="store_true")
    ap.add_argument("--bucket", default=os.environ.get("FLAG_S3_BUCKET", "flag-test"))
    a = ap.parse_args()
    names = ["moto", "seaweedfs"] if a.which == "both" else [a.which]
    results = {}
    for name in names:
        res = {}
        results[name] = res
        s3 = client(ENDPOINTS[name])
        try:
            s3.head_bucket(Bucket=a.bucket)
        except ClientError:
            s3.create_bucket(Bucket=a.bucket)
        st = os.path.join(STATE, name + ".startup_s")
        if os.path.exists(st):
            res["t0 startup (spawn -> ready, per up.sh)"] = open(st).read().strip() + "s"
        steps = [("conditional", lambda: probe_conditional(s3, a.bucket, res)),
                 ("list/delete", lambda: probe_list_delete(s3, a.bucket, res)),
                 ("auth", lambda: probe_auth(ENDPOINTS[name], a.bucket, res)),
                 ("race", lambda: (probe_race(s3, a.bucket, res, 30, 2), probe_race(s3, a.bucket, res, 20, 8))),
                 ("multipart", lambda: probe_multipart(s3, a.bucket, res))]
        if not a.no_perf:
            steps.append(("perf", lambda: probe_perf(s3, a.bucket, res)))
        for label, fn in steps:
            print("probe %s: %s" % (name, label), file=sys.stderr)
            try:
                fn()
            except Exception as e:  # keep surveying; show what broke
                res["!! %s failed" % label] = repr(e)[:200]
        if not a.no_crash:
            print("probe %s: kill -9 + restart" % name, file=sys.stderr)
            try:
                probe_crash(name, s3, a.bucket, res)
            except Exception as e:
                res["!! crash failed"] = repr(e)[:200]
            if name == "moto":
                res["d8 note"] = "in-memory: restart loses all (up.sh re-creates the bucket)"
    keys = []
    for name in names:
        for k in results[name]:
            if k not in keys:
                keys.append(k)
    def order(k):
        import re
        m = re.match(r"([a-z]+)(\d+)", k)
        return (k[:1] == "!", m.group(1) if m else k, int(m.group(2)) if m else 0, k)
    keys.sort(key=order)
    w0 = max(len(k) for k in keys)
    cols = [max([len(n)] + [len(results[n].get(k, "")) for k in keys]) for n in names]
    line = "| %s | %s |" % ("check".ljust(w0), " | ".join(n.ljust(c) for n, c in zip(names, cols)))
    print(line)
    print("|%s|%s|" % ("-" * (w0 + 2), "|".join("-" * (c + 2) for c in cols)))
    for k in keys:
        print("| %s | %s |" % (k.ljust(w0), " | ".join(results[n].get(k, "").ljust(c) for n, c in zip(names, cols))))


if __name__ == "__main__":
    main()
