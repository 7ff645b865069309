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
		if r.URL.Path == VersionPath && r.Method == http.MethodGet {
			next.ServeHTTP(w, r)
			return
		}
		got, ok := bearer(r.Header.Get("Authorization"))
		if ok && !empty {
			sum := sha256.Sum256([]byte(got))
			if subtle.ConstantTimeCompare(sum[:], want[:]) == 1 {
				next.ServeHTTP(w, r)
				return
			}
		}
		w.Header().Set("WWW-Authenticate", `Bearer realm="ukai"`)
		writeError(w, http.StatusUnauthorized, errUnauthorized)
	})
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
