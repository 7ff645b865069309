package api

import (
	"crypto/sha256"
	"crypto/subtle"
	"errors"
	"net/http"
	"strings"
)

// VersionPath is the one endpoint RequireToken leaves open (GET only): it
// tells a client which ukai answers, and nothing about the cluster, so a
// client can check that it reaches a node before it has a token.
const VersionPath = "/v1/version"

// HealthPath is open too (GET only): load balancers and monitors poll it
// without a token, and it says only whether this node can serve.
const HealthPath = "/v1/health"

// TokenCookie carries the token of a browser (the web view): set by
// POST /ui/login, HttpOnly and SameSite=Strict, and accepted only on GET
// and HEAD, so a page of another site can neither read it nor make a
// browser change anything with it.
const TokenCookie = "ukai_token"

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
		if (r.URL.Path == VersionPath || r.URL.Path == HealthPath) && r.Method == http.MethodGet {
			next.ServeHTTP(w, r)
			return
		}
		if r.URL.Path == LoginPath {
			login(w, r, want, empty)
			return
		}
		got, ok := bearer(r.Header.Get("Authorization"))
		if !ok && (r.Method == http.MethodGet || r.Method == http.MethodHead) {
			if c, err := r.Cookie(TokenCookie); err == nil && c.Value != "" {
				got, ok = c.Value, true
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

// LoginPath is where the web view's login form posts the token.
const LoginPath = "/ui/login"

// login checks the token a browser sends (form field "token", POST) and,
// when right, sets TokenCookie and sends the browser to the web view
// ("next", a path under /ui/, or /ui/). A wrong token gets the form again
// with 401.
func login(w http.ResponseWriter, r *http.Request, want [32]byte, empty bool) {
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
		Name: TokenCookie, Value: tok, Path: "/", HttpOnly: true,
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
