package api

import (
	"crypto/hmac"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"errors"
	"net/http"
	"strconv"
	"strings"
	"time"
)

// VersionPath is the one endpoint RequireToken leaves open (GET only): it
// tells a client which ukai answers, and nothing about the cluster, so a
// client can check that it reaches a node before it has a token.
const VersionPath = "/v1/version"

// HealthPath is open too (GET only): load balancers and monitors poll it
// without a token, and it says only whether this node can serve.
const HealthPath = "/v1/health"

// TokenCookie is a browser's proof of the token (the web view): set by
// POST /ui/login, HttpOnly, SameSite=Strict, for 12 hours (checked by the
// node, not only the browser). Its value is not the token but an expiry
// and an HMAC of it keyed by the token (CookieValue): browsers send a
// host's cookies to every port of that host, so another service there
// could see it, and it must not be worth the token. It is accepted only on GET and
// HEAD of what the web view reads (cookieAllowed): never for a change,
// nor for an image's data.
const TokenCookie = "ukai_ui"

// cookieMaxAge is how long a web view login lasts.
const cookieMaxAge = 12 * 3600

// CookieValue is the web view's cookie for token, valid until exp:
// "EXP.MAC", EXP in Unix seconds and MAC the hex HMAC-SHA256 of it keyed
// by the token. The node checks the time itself: a cookie copied
// elsewhere dies with its expiry, not only in the browser.
func CookieValue(token []byte, exp time.Time) string {
	e := strconv.FormatInt(exp.Unix(), 10)
	return e + "." + cookieMAC(token, e)
}

func cookieMAC(token []byte, exp string) string {
	m := hmac.New(sha256.New, token)
	m.Write([]byte("ukai web view cookie v2 " + exp))
	return hex.EncodeToString(m.Sum(nil))
}

// cookieValid checks a cookie against token and the time.
func cookieValid(token []byte, v string, now time.Time) bool {
	e, mac, ok := strings.Cut(v, ".")
	if !ok {
		return false
	}
	exp, err := strconv.ParseInt(e, 10, 64)
	if err != nil || now.Unix() >= exp || exp > now.Add(cookieMaxAge*time.Second+time.Minute).Unix() {
		return false
	}
	return hmac.Equal([]byte(mac), []byte(cookieMAC(token, e)))
}

// cookieAllowed says whether a GET of path may be authorized by the web
// view's cookie: the page itself and the API reads it makes.
func cookieAllowed(path string) bool {
	switch path {
	case "/v1/node", "/v1/nodes", "/v1/images":
		return true
	}
	if strings.HasPrefix(path, "/ui/") {
		return true
	}
	name, ok := strings.CutPrefix(path, "/v1/images/")
	return ok && name != "" && !strings.Contains(name, "/")
}

// errUnauthorized is the body of every refusal; it never says which part
// was wrong.
var errUnauthorized = errors.New("missing or invalid bearer token")

// RequireToken lets a request through to next only when it carries
// "Authorization: Bearer <token>". Others get 401 with
// WWW-Authenticate: Bearer and {"error": "missing or invalid bearer token"},
// and next is not called (the body is not read), so a refused request
// changes nothing. GET /v1/version stays open (see VersionPath).
//
// The comparison takes constant time (both sides are hashed first, so not
// even the length leaks). An empty token refuses every request rather
// than opening the API. RequireToken never logs: neither the token nor
// what the client sent. Wrap the handler of NewHandler with it; refused
// requests are then not in the request log.
func RequireToken(next http.Handler, token []byte) http.Handler {
	want := sha256.Sum256(token)
	empty := len(token) == 0
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		read := r.Method == http.MethodGet || r.Method == http.MethodHead
		if (r.URL.Path == VersionPath || r.URL.Path == HealthPath) && read {
			next.ServeHTTP(w, r)
			return
		}
		switch r.URL.Path {
		case LoginPath:
			login(w, r, want, empty, token)
			return
		case LogoutPath:
			http.SetCookie(w, &http.Cookie{Name: TokenCookie, Value: "", Path: "/", MaxAge: -1, HttpOnly: true, SameSite: http.SameSiteStrictMode})
			http.Redirect(w, r, LoginPath, http.StatusSeeOther)
			return
		}
		got, ok := bearer(r.Header.Get("Authorization"))
		if !ok && read && !empty && cookieAllowed(r.URL.Path) {
			if c, err := r.Cookie(TokenCookie); err == nil && cookieValid(token, c.Value, time.Now()) {
				next.ServeHTTP(w, r)
				return
			}
		}
		if ok && !empty {
			sum := sha256.Sum256([]byte(got))
			if subtle.ConstantTimeCompare(sum[:], want[:]) == 1 {
				next.ServeHTTP(w, r)
				return
			}
		}
		if strings.HasPrefix(r.URL.Path, "/ui") {
			loginPage(w, http.StatusUnauthorized, "")
			return
		}
		w.Header().Set("WWW-Authenticate", `Bearer realm="ukai"`)
		writeError(w, http.StatusUnauthorized, errUnauthorized)
	})
}

// LoginPath is where the web view's login form posts the token;
// LogoutPath drops the cookie.
const (
	LoginPath  = "/ui/login"
	LogoutPath = "/ui/logout"
)

// login checks the token a browser sends (form field "token", POST) and,
// when right, sets TokenCookie and sends the browser to the web view
// ("next", a path under /ui/, or /ui/). A wrong token gets the form again
// with 401.
func login(w http.ResponseWriter, r *http.Request, want [32]byte, empty bool, token []byte) {
	if r.Method != http.MethodPost {
		loginPage(w, http.StatusOK, "")
		return
	}
	r.Body = http.MaxBytesReader(w, r.Body, 8<<10)
	tok := strings.TrimSpace(r.PostFormValue("token"))
	sum := sha256.Sum256([]byte(tok))
	if empty || tok == "" || subtle.ConstantTimeCompare(sum[:], want[:]) != 1 {
		loginPage(w, http.StatusUnauthorized, "wrong token")
		return
	}
	http.SetCookie(w, &http.Cookie{
		Name: TokenCookie, Value: CookieValue(token, time.Now().Add(cookieMaxAge*time.Second)), Path: "/", MaxAge: cookieMaxAge, HttpOnly: true,
		Secure: r.TLS != nil, SameSite: http.SameSiteStrictMode,
	})
	next := r.PostFormValue("next")
	if !strings.HasPrefix(next, "/ui/") || strings.HasPrefix(next, "//") || strings.ContainsAny(next, "\\\r\n") {
		next = "/ui/"
	}
	http.Redirect(w, r, next, http.StatusSeeOther)
}

// loginPage is the web view's login form.
func loginPage(w http.ResponseWriter, status int, msg string) {
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	w.Header().Set("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'")
	w.WriteHeader(status)
	note := ""
	if msg != "" {
		note = `<p id="error" style="color:#b00">` + msg + `</p>`
	}
	_, _ = w.Write([]byte(`<!doctype html><html><head><meta charset="utf-8"><title>ukai: log in</title></head>
<body style="font-family:sans-serif;max-width:30em;margin:4em auto">
<h1>ukai</h1><p>This node's API needs its token (the content of <code>api.token_file</code>).</p>` + note + `
<form method="post" action="` + LoginPath + `"><input type="password" name="token" autofocus size="40">
<input type="hidden" name="next" value="/ui/"> <button type="submit">Log in</button></form></body></html>`))
}

// bearer extracts the credentials of an "Authorization: Bearer <t>" header
// (the scheme is case-insensitive, RFC 7235).
func bearer(h string) (string, bool) {
	scheme, cred, ok := strings.Cut(strings.TrimSpace(h), " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") {
		return "", false
	}
	cred = strings.TrimSpace(cred)
	return cred, cred != ""
}
