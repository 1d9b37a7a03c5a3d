-- The auth side's users. The email is stored exactly as given; uniqueness ignores case, so
-- Alice@Example.com and alice@example.com are one account.
create table users (
    id bigint generated always as identity primary key,
    email text not null,
    display_name text not null,
    created_at timestamptz not null default now(),
    -- RFC 5321 caps a forward path at 254 characters; the library checks the rest of the shape.
    constraint users_email_length check (char_length(email) between 3 and 254),
    constraint users_display_name_length check (char_length(display_name) between 1 and 64),
    -- A name of spaces only would show as nothing in every UI.
    constraint users_display_name_not_blank check (btrim(display_name) <> '')
);

-- Matched by name in the library to report "email already registered".
create unique index users_email_key on users (lower(email));
