"""A small client of the ukai control API (HTTP/JSON under /v1).

Several API addresses may be given: each call tries them in order and
uses the first that answers (any ukai node serves the whole API). Errors
keep ukai's message: UkaiError carries the HTTP status and the text of
ukai's {"error": ...} body.
"""

import json
import os
import stat
import urllib.parse

import requests
from urllib3 import exceptions as urllib3_exc

# Methods whose repetition on another node is harmless when the first
# node may have received them.
IDEMPOTENT = ('GET', 'PUT', 'DELETE', 'HEAD')


def _never_sent(e):
    """Whether a requests failure happened before the request could reach
    the server (connection refused, no route, connect timeout)."""
    if isinstance(e, requests.exceptions.ConnectTimeout):
        return True
    reason = e.args[0] if e.args else None
    reason = getattr(reason, 'reason', reason)
    return isinstance(reason, (urllib3_exc.NewConnectionError, urllib3_exc.ConnectTimeoutError))


class UkaiError(Exception):
    """An answer from ukai that is not a success, or no answer at all."""

    def __init__(self, status, message, address=None):
        self.status = status          # HTTP status; None when unreachable
        self.message = message        # ukai's own words
        self.address = address
        super().__init__(self.__str__())

    def __str__(self):
        if self.status is None:
            return "ukai API unreachable (%s)" % self.message
        return "ukai API %s: %s" % (self.status, self.message)


def read_token(path):
    """The bearer token in path; refused when the file is world-readable
    (the same rule ukai applies to its own secret files)."""
    st = os.stat(path)
    if st.st_mode & stat.S_IROTH:
        raise UkaiError(None, "token file %s is world-readable: refused" % path)
    with open(path) as f:
        token = f.read().strip()
    if not token:
        raise UkaiError(None, "token file %s is empty" % path)
    return token


class Client(object):
    def __init__(self, addresses, token=None, ca_file=None, timeout=60,
                 allow_insecure=False):
        """addresses must be https:// URLs unless allow_insecure (then a
        bare host:port means http://): the token and CHAP secrets travel
        in these requests."""
        if not addresses:
            raise UkaiError(None, "no ukai API address configured")
        self.addresses = [self._base(a, allow_insecure) for a in addresses]
        self.token = token
        self.verify = ca_file if ca_file else True
        self.timeout = timeout
        self.session = requests.Session()

    @staticmethod
    def _base(addr, allow_insecure=False):
        addr = addr.strip().rstrip("/")
        if addr.lower().startswith("https://"):
            return addr
        if not allow_insecure:
            raise UkaiError(None, "API address %s is not https://: refused (the token and CHAP "
                                  "secrets would travel in cleartext; set "
                                  "ukai_api_allow_insecure = True to allow it)" % addr)
        if "://" not in addr:
            addr = "http://" + addr
        return addr

    def _headers(self, extra=None):
        h = {}
        if self.token:
            h["Authorization"] = "Bearer " + self.token
        if extra:
            h.update(extra)
        return h

    def request(self, method, path, body=None, data=None, stream=False,
                timeout=None, expect_json=True):
        """Send the request to the first address that answers. A
        connection failure moves on to the next address; an HTTP error
        answer is final (the cluster said no)."""
        errors = []
        for base in self.addresses:
            headers = self._headers()
            kwargs = {}
            if body is not None:
                kwargs["data"] = json.dumps(body)
                headers["Content-Type"] = "application/json"
            elif data is not None:
                if hasattr(data, "seek"):
                    data.seek(0)
                kwargs["data"] = data
                headers["Content-Type"] = "application/octet-stream"
            try:
                # Connecting is bounded by the API timeout even for long
                # copies: a dead address must not hold up the next one.
                resp = self.session.request(
                    method, base + path, headers=headers, verify=self.verify,
                    timeout=(self.timeout, timeout or self.timeout), stream=stream, **kwargs)
            except requests.exceptions.SSLError as e:
                # A TLS problem is not one a second address would fix
                # silently: report it.
                raise UkaiError(None, "%s: TLS: %s" % (base, e), base)
            except requests.exceptions.RequestException as e:
                if _never_sent(e) or (method in IDEMPOTENT and data is None):
                    # Not reached (or harmless to repeat): the next
                    # address may answer.
                    errors.append("%s: %s" % (base, e))
                    continue
                # Maybe received: repeating it elsewhere could do the
                # change twice.
                raise UkaiError(None, "%s: %s (the request may have been carried out)" % (base, e), base)
            except OSError as e:
                # A missing or unreadable CA file, for one.
                raise UkaiError(None, "%s: %s" % (base, e), base)
            if resp.status_code >= 300:
                msg = resp.text.strip()
                try:
                    msg = resp.json().get("error", msg)
                except ValueError:
                    pass
                resp.close()
                raise UkaiError(resp.status_code, msg, base)
            if stream:
                return resp
            if not expect_json or resp.status_code == 204 or not resp.content:
                return None
            try:
                return resp.json()
            except ValueError:
                raise UkaiError(resp.status_code, "not JSON: %r" % resp.text[:200], base)
        raise UkaiError(None, "; ".join(errors))

    # Images.
    @staticmethod
    def _q(name):
        return urllib.parse.quote(name, safe="")

    def version(self):
        return self.request("GET", "/v1/version")

    def nodes(self):
        return self.request("GET", "/v1/nodes")["nodes"]

    def images(self):
        return self.request("GET", "/v1/images")["images"]

    def image(self, name):
        return self.request("GET", "/v1/images/" + self._q(name))

    @staticmethod
    def _body(required, **optional):
        """A request body: the required fields and the optional ones set."""
        body = dict(required)
        body.update((k, v) for k, v in optional.items() if v)
        return body

    def create_image(self, name, size, locations=None, min_copies=None,
                     block_size=None, source=None, timeout=None):
        body = self._body({"name": name, "size": size}, locations=locations, min_copies=min_copies,
                          block_size=block_size, source=source)
        return self.request("POST", "/v1/images", body=body, timeout=timeout)

    def delete_image(self, name, now=True):
        """Delete an image at once (now), or move it to ukai's trash."""
        self.request("DELETE", "/v1/images/" + self._q(name) + ("?now=true" if now else ""))

    def resize(self, name, size):
        return self.request("POST", "/v1/images/%s/resize" % self._q(name), body={"size": size})

    def create_snapshot(self, image, name):
        return self.request("POST", "/v1/images/%s/snapshots" % self._q(image), body={"name": name})

    def snapshots(self, image):
        return self.request("GET", "/v1/images/%s/snapshots" % self._q(image))["snapshots"]

    def revert_snapshot(self, image, name, timeout=None):
        return self.request("POST", "/v1/images/%s/snapshots/%s/revert" % (self._q(image), self._q(name)),
                            timeout=timeout)

    def delete_snapshot(self, image, name):
        self.request("DELETE", "/v1/images/%s/snapshots/%s" % (self._q(image), self._q(name)))

    def set_policy(self, image, replicas=None, locations=None, locality=None):
        body = self._body({} if replicas is None else {"replicas": replicas}, locations=locations,
                          locality=locality)
        return self.request("PUT", "/v1/images/%s/policy" % self._q(image), body=body)

    def set_qos(self, image, clear=False, **limits):
        """Sets the image's QoS limits (iops_limit, bw_burst, ...: the
        names of PUT /v1/images/{name}/qos); clear removes the others."""
        body = dict(limits)
        if clear:
            body["clear"] = True
        return self.request("PUT", "/v1/images/%s/qos" % self._q(image), body=body)

    def set_sync_policy(self, image, windows=None, max_rate=None, tz=None):
        body = self._body({"scope": "image:" + image}, windows=windows, max_rate=max_rate, tz=tz)
        self.request("PUT", "/v1/policies/sync", body=body)

    def attach(self, image, node):
        return self.request("POST", "/v1/images/%s/attach" % self._q(image), body={"node": node})

    def detach(self, image):
        return self.request("POST", "/v1/images/%s/detach" % self._q(image), body={})

    def relocate(self, image, to):
        return self.request("POST", "/v1/images/%s/relocate" % self._q(image), body={"to": to})

    def export(self, image, initiator, chap_user=None, chap_secret=None):
        body = self._body({"initiator": initiator}, chap_user=chap_user,
                          chap_secret=chap_secret if chap_user else None)
        self.request("POST", "/v1/images/%s/exports" % self._q(image), body=body)

    def unexport(self, image, initiator):
        self.request("DELETE", "/v1/images/%s/exports/%s" % (self._q(image), self._q(initiator)))

    def write_data(self, image, fileobj, timeout=None):
        return self.request("PUT", "/v1/images/%s/data" % self._q(image), data=fileobj,
                            timeout=timeout)

    def read_data(self, image, out, timeout=None, chunk=4 << 20):
        """Stream the image into the file object out; returns the byte
        count. A stream shorter than announced is an error."""
        resp = self.request("GET", "/v1/images/%s/data" % self._q(image), stream=True,
                            timeout=timeout)
        want = int(resp.headers.get("Content-Length", "-1"))
        got = 0
        sparse = hasattr(out, "seek") and hasattr(out, "truncate")
        try:
            for block in resp.iter_content(chunk):
                if sparse and not block.strip(b"\0"):
                    # Zeros: leave a hole (the file stays as thin as the
                    # image), the size is set at the end.
                    out.seek(len(block), 1)
                else:
                    out.write(block)
                got += len(block)
        except requests.exceptions.RequestException as e:
            raise UkaiError(None, "image data of %s cut after %d bytes: %s" % (image, got, e))
        finally:
            resp.close()
        if want >= 0 and got != want:
            raise UkaiError(None, "image data of %s: %d of %d bytes" % (image, got, want))
        if sparse:
            out.truncate(got)
        return got
