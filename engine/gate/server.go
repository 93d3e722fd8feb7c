package gate

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"log/slog"
	"net"
	"net/http"
	"time"

	"github.com/kilnbuild/kiln/engine/attest"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// MaxRequestBytes bounds one decision request (provenance, summaries, SBOM, lockfile).
const MaxRequestBytes = 64 << 20

// HTTPRequest is the JSON body of POST /v1/decide: the same inputs as the CLI, each
// document as its exact bytes (base64), since a summary names the provenance by the
// SHA-256 of its bytes.
type HTTPRequest struct {
	// Subject is "sha256:HEX" (or HEX); SubjectName optionally names it.
	Subject     string    `json:"subject"`
	SubjectName string    `json:"subject_name,omitempty"`
	Stage       string    `json:"stage,omitempty"`
	Provenance  *HTTPDoc  `json:"provenance,omitempty"`
	VSAs        []HTTPDoc `json:"vsas,omitempty"`
	SBOM        *HTTPDoc  `json:"sbom,omitempty"`
	Lockfile    *HTTPDoc  `json:"lockfile,omitempty"`
}

// HTTPDoc is one document: a name and its bytes (base64 in JSON).
type HTTPDoc struct {
	Name string `json:"name"`
	Data []byte `json:"data"`
}

// HTTPResponse is the answer: the decision and, signed, its envelope (base64).
type HTTPResponse struct {
	*Decision
	Envelope []byte `json:"envelope,omitempty"`
}

// HTTPError is the body of a non-200 answer.
type HTTPError struct {
	Error string `json:"error"`
}

func (d *HTTPDoc) doc() *Doc {
	if d == nil {
		return nil
	}
	return &Doc{Name: d.Name, Data: d.Data}
}

// Request turns the HTTP form into a gate request.
func (r *HTTPRequest) Request() (Request, error) {
	subj, err := attest.ParseDigestSubject(r.Subject)
	if err != nil {
		return Request{}, err
	}
	if r.SubjectName != "" {
		subj.Name = r.SubjectName
	}
	req := Request{Stage: r.Stage, Subject: subj, Provenance: r.Provenance.doc(), SBOM: r.SBOM.doc(), Lockfile: r.Lockfile.doc()}
	for i := range r.VSAs {
		req.VSAs = append(req.VSAs, *r.VSAs[i].doc())
	}
	return req, nil
}

// Handler serves POST /v1/decide (a decision: 200 whether it allows or denies; 400 for
// a request the gate cannot decide, e.g. a stage the policy is not for) and GET /healthz.
func (g *Gate) Handler(log *slog.Logger) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		w.Write([]byte("ok\n"))
	})
	mux.HandleFunc("POST /v1/decide", func(w http.ResponseWriter, r *http.Request) {
		var hr HTTPRequest
		dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, MaxRequestBytes))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&hr); err != nil {
			writeJSON(w, http.StatusBadRequest, HTTPError{Error: "request: " + err.Error()})
			return
		}
		req, err := hr.Request()
		if err == nil {
			var d *Decision
			if d, err = g.Decide(r.Context(), req); err == nil {
				client := ""
				if r.TLS != nil && len(r.TLS.PeerCertificates) > 0 {
					client = r.TLS.PeerCertificates[0].Subject.String()
				}
				log.Info("gate decision", "subject", "sha256:"+req.Subject.SHA256, "stage", d.Stage, "decision", d.Decision, "violations", len(d.Violations), "client", client)
				writeJSON(w, http.StatusOK, HTTPResponse{Decision: d, Envelope: d.Envelope})
				return
			}
		}
		code := http.StatusInternalServerError
		if c := status.Code(err); c == codes.InvalidArgument || c == codes.NotFound {
			code = http.StatusBadRequest
		}
		writeJSON(w, code, HTTPError{Error: status.Convert(err).Message()})
	})
	return mux
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	enc := json.NewEncoder(w)
	enc.SetEscapeHTML(false)
	enc.Encode(v)
}

// Serve answers decisions on lis (over TLS when tc is not nil) until ctx ends.
func Serve(ctx context.Context, lis net.Listener, tc *tls.Config, h http.Handler, log *slog.Logger) error {
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second, ReadTimeout: time.Minute, IdleTimeout: 2 * time.Minute,
		ErrorLog: slog.NewLogLogger(log.Handler(), slog.LevelWarn), TLSConfig: tc}
	done := make(chan error, 1)
	go func() {
		if tc != nil {
			done <- srv.ServeTLS(lis, "", "")
		} else {
			done <- srv.Serve(lis)
		}
	}()
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	err := srv.Shutdown(sctx)
	if e := <-done; !errors.Is(e, http.ErrServerClosed) && err == nil {
		err = e
	}
	return err
}
